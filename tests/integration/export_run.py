"""Trains a few steps with launch/pretrain.py's Trainer, then saves the live ZeRO-3 model's logits on a
fixed batch, for comparison with the exported model.

torchrun --nproc_per_node 2 export_run.py CORPUS OUT
"""

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from step3vl_train.processing.processor import collate, load_processor
from step3vl_train.train.recipes import register_recipes
from step3vl_train.train.trainer import Trainer
from tests.integration.test_pretrain import TINY

REPO = Path(__file__).resolve().parents[2]


def fixed_batch():
    processor = load_processor("tiny", str(REPO / "configs/processor/tiny.yaml"))
    photo = Image.open(REPO / "data/samples/chelsea.png").convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    return collate([processor(messages, [photo], add_generation_prompt=True)], 0).model_inputs(with_labels=False)


def main() -> None:
    corpus, out = sys.argv[1], Path(sys.argv[2])
    register_recipes()
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose(
            "pretrain",
            ["+recipe=pretrain", *TINY, f"data.root={corpus}", f"trainer.output_dir={out}", "trainer.max_steps=2"],
        )
    trainer = Trainer(cfg)
    trainer.run()
    trainer.ds.engine.eval()
    with torch.no_grad():
        logits = trainer.ds.engine(**fixed_batch()).logits
    if trainer.rank == 0:
        torch.save(logits, out / "live_logits.pt")
    trainer.close()


if __name__ == "__main__":
    main()
