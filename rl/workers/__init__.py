"""Ray actors: training ranks (policy and critic), rollout engines."""
