"""The peer of our RL iteration: TRL's GRPOTrainer on the task of peers_task.py, run in .venv-peers by
`benchmarks/peers_cpu.py rl|reward`, one process (TRL generates with the policy itself, in-process).

python benchmarks/peers/trl_grpo.py WORK MODEL_DIR OUT.json --steps 30 --prompts-per-step 4 --n 8 --max-new-tokens 4

WORK holds what our side wrote: `tokenizer/` (our tiny tokenizer), `rl_prompts.jsonl` (each prompt as the
exact text our processor renders, generation prompt included, and its kind). MODEL_DIR is a Qwen3ForCausalLM
with our decoder's shape and starting weights. Every iteration is one generation and one optimizer step
(exactly on-policy: TRL then skips its old-log-prob pass). OUT.json: the wall time between consecutive
optimizer steps and TRL's logged reward mean of each.
"""

import json

import torch
from datasets import Dataset
from peers_task import trl_reward
from step_clock import StepClock
from trainer_arguments import peer_parser, shared_arguments
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer


def main() -> None:
    parser = peer_parser(__doc__)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--n", type=int, default=8, help="responses a prompt")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.work / "tokenizer")
    rows = [json.loads(line) for line in (args.work / "rl_prompts.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["prompt_text"], "answer": r["answer"]} for r in rows])
    config = GRPOConfig(
        output_dir=str(args.out.parent / "trl_run"),
        per_device_train_batch_size=args.prompts_per_step * args.n,  # completions a step
        steps_per_generation=1,
        num_iterations=1,
        num_generations=args.n,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,  # no reference model, as ours (no KL term)
        epsilon=0.2,
        loss_type="dapo",  # token-mean over the batch: our algo.loss_aggregation=token-mean
        scale_rewards="group",  # our grpo_scale_by_std
        use_cpu=True,
        bf16=False,
        shuffle_dataset=False,  # the prompts in file order, as ours reads them: each batch holds 2 of each kind
        **shared_arguments(args.lr, weight_decay=0.0, steps=args.steps, seed=args.seed),  # RL's policy.optim
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    clock = StepClock("reward")
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=trl_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.train()
    steps = clock.step_seconds()
    args.out.write_text(json.dumps({"step_s": steps, "rewards": clock.values, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
