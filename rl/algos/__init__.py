"""Advantage estimators and the PPO losses."""
