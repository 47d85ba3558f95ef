"""What both peers' scripts share: their command line (the work folder `benchmarks/peers_cpu.py` writes,
the model, the result file, the steps), and their Trainer arguments: our optimizer as `configs/optim` sets
it (AdamW, betas 0.9 and 0.95, eps 1e-8, clipping at 1.0, a constant rate with no warmup), one
micro-batch a step, a log line every step, and nothing saved, reported or drawn."""

import argparse
from pathlib import Path


def peer_parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=30)
    return parser


def shared_arguments(lr: float, weight_decay: float, steps: int, seed: int) -> dict:
    return {
        "learning_rate": lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": weight_decay,
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0,
        "gradient_accumulation_steps": 1,
        "max_steps": steps,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": seed,
    }
