"""STEP3-VL-10B training. Importing the package registers the model with transformers' Auto classes
(step3vl_train/model/__init__.py), so that they open our exports without `trust_remote_code`."""

import step3vl_train.model  # noqa: F401
