"""Reinforcement learning: `python rl/run.py stage=rlvr` (see docs/rl.md)."""
