"""Scoring a released-format checkpoint on a benchmark (`launch/evaluate.py`, docs/evaluation.md): SeRe
and PaCoRe side by side, each with a 95% confidence interval, every response written with its score."""
