"""The reward-model service: a Ray Serve application that scores responses for RLHF (rl/serve_rm.py)."""
