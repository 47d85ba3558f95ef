"""CPU timings of the model code: a tiny-model training step on a real photo batch, and building the
full-size model on the meta device. Prints one JSON object.

    python benchmarks/model_cpu.py [--steps 20] [--batch 4]
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from step3vl_train.model import Step3VLConfig, Step3VLForConditionalGeneration
from step3vl_train.model.counting import build_on_meta
from step3vl_train.processing.config import ProcessorConfig
from step3vl_train.processing.images import load_image
from step3vl_train.processing.processor import Step3VLProcessor, collate
from step3vl_train.processing.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def model_config(name: str) -> Step3VLConfig:
    return Step3VLConfig.from_dict(OmegaConf.to_container(OmegaConf.load(REPO / f"configs/model/{name}.yaml")))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)

    model = Step3VLForConditionalGeneration(model_config("tiny")).train()
    processor_cfg = ProcessorConfig.from_dict(
        OmegaConf.to_container(OmegaConf.load(REPO / "configs/processor/tiny.yaml"))
    )
    processor = Step3VLProcessor(load_tokenizer("tiny"), processor_cfg)
    photo = load_image(REPO / "data/samples/chelsea.png")
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What animal is in the picture?"}]},
        {"role": "assistant", "reasoning_content": "Whiskers, ears and striped fur.", "content": "A cat."},
    ]
    batch = collate([processor(conversation, [photo])] * args.batch, processor.tokenizer.pad_token_id)

    timings = []
    for step in range(args.steps + 2):
        start = time.perf_counter()
        model(**batch.model_inputs()).loss.backward()
        model.zero_grad(set_to_none=True)
        if step >= 2:  # warm-up
            timings.append(time.perf_counter() - start)

    start = time.perf_counter()
    build_on_meta(model_config("step3vl_10b"))
    meta_build_s = time.perf_counter() - start

    print(
        json.dumps(
            {
                "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                "torch": torch.__version__,
                "tiny_train_step": {
                    "batch": args.batch,
                    "tokens": int(batch.attention_mask.sum()),
                    "crops_per_image": batch.num_patches[0],
                    "median_s": round(statistics.median(timings), 4),
                    "max_s": round(max(timings), 4),
                },
                "step3vl_10b_meta_build_s": round(meta_build_s, 2),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
