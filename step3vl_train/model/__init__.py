from step3vl_train.model.config import Step3VLConfig, Step3VLVisionConfig
from step3vl_train.model.step3vl import Step3VLForConditionalGeneration
from step3vl_train.model.view_selection import ImageTokenMismatchError

__all__ = ["ImageTokenMismatchError", "Step3VLConfig", "Step3VLForConditionalGeneration", "Step3VLVisionConfig"]
