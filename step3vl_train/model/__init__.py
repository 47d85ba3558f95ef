from step3vl_train.model.config import Step3VLConfig, Step3VLVisionConfig
from step3vl_train.model.step3vl import ImageTokenMismatchError, Step3VLForConditionalGeneration

__all__ = ["ImageTokenMismatchError", "Step3VLConfig", "Step3VLForConditionalGeneration", "Step3VLVisionConfig"]
