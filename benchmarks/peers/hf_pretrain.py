"""The peer of our pre-training step: transformers' Trainer with DeepSpeed ZeRO-3 on a plain Qwen3, run in
.venv-peers by `benchmarks/peers_cpu.py pretrain` (under torchrun, gloo, one process a rank).

torchrun --nproc_per_node 2 benchmarks/peers/hf_pretrain.py WORK MODEL_DIR OUT.json --steps 30 --batch 4

WORK holds what our side wrote: `pretrain_rows.npy` (int32 rows of our tiny tokenizer's tokens, seq_len
each) and `deepspeed.json` (our configs/deepspeed/zero3.yaml). MODEL_DIR: our decoder's shape and starting
weights as a Qwen3ForCausalLM. Rank 0 writes OUT.json: the wall time between consecutive optimizer steps
(everything the loop does, data included) and the losses.
"""

import json
import warnings

import deepspeed
import numpy as np
import torch
from step_clock import StepClock
from trainer_arguments import peer_parser, shared_arguments
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows: np.ndarray):
        self.rows = torch.from_numpy(rows.astype(np.int64))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.rows[index], "labels": self.rows[index]}


def main() -> None:
    parser = peer_parser(__doc__)
    parser.add_argument("--batch", type=int, default=4, help="rows a rank a step (micro-batch, no accumulation)")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's, once a step: not the loop's cost
    deepspeed.init_distributed(dist_backend="gloo")  # before TrainingArguments: accelerate takes it as it is
    ds_config = json.loads((args.work / "deepspeed.json").read_text())
    ds_config |= {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    ds_config |= {"gradient_clipping": "auto", "bf16": {"enabled": False}}
    training = TrainingArguments(
        output_dir=str(args.out.parent / "hf_pretrain_run"),
        per_device_train_batch_size=args.batch,
        deepspeed=ds_config,
        ddp_backend="gloo",
        **shared_arguments(args.lr, weight_decay=0.01, steps=args.steps, seed=0),  # our pre-training's decay
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    clock = StepClock("loss")
    rows = Rows(np.load(args.work / "pretrain_rows.npy"))
    trainer = Trainer(model=model, args=training, train_dataset=rows, callbacks=[clock])
    trainer.train()
    if torch.distributed.get_rank() == 0:
        steps = clock.step_seconds()
        stage = trainer.model_wrapped.zero_optimization_stage()
        result = {"step_s": steps, "losses": clock.values, "threads": torch.get_num_threads(), "zero_stage": stage}
        args.out.write_text(json.dumps(result))
    torch.distributed.destroy_process_group()  # without it a rank may abort at exit (gloo's threads)


if __name__ == "__main__":
    main()
