from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from step3vl_train.model.config import Step3VLConfig, Step3VLVisionConfig
from step3vl_train.model.step3vl import Step3VLForConditionalGeneration
from step3vl_train.model.view_selection import ImageTokenMismatchError


def register_auto_classes() -> None:
    """Makes transformers' Auto classes open a `step_robotics` directory with our classes, without
    `trust_remote_code`. Idempotent; transformers 5.20 has no `step_robotics` of its own, and should a later
    version add one, ours stays first (exist_ok)."""
    AutoConfig.register(Step3VLConfig.model_type, Step3VLConfig, exist_ok=True)
    for auto_class in (AutoModelForCausalLM, AutoModelForImageTextToText):
        auto_class.register(Step3VLConfig, Step3VLForConditionalGeneration, exist_ok=True)


register_auto_classes()

__all__ = [
    "ImageTokenMismatchError",
    "Step3VLConfig",
    "Step3VLForConditionalGeneration",
    "Step3VLVisionConfig",
    "register_auto_classes",
]
