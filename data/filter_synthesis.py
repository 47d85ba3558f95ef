"""Synthesis filtration (spec 5.7): keep the PaCoRe prompts a policy solves sometimes but not always when
given messages from their pools, so that training never sees a synthesis already trivial (or hopeless).

python data/filter_synthesis.py --k 8 --out DIR -- stage=pacore prompts.root=POOLS policy.init_from=MODEL \
    tokenizer=... [pacore.messages=[16,24]] [pacore.seed=0] [rollout=vllm] [rollout.max_new_tokens=...]

POOLS holds prompt shards whose samples carry a `pool` (data/filter_difficulty.py --save-messages, or
data/import_pools.py). Everything after `--` is a Hydra override of the RL config (configs/rl.yaml) under
`stage=pacore`: each prompt's messages M, |M| ~ U(pacore.messages), are drawn from its pool as training
draws them, for a step 0 that training never reaches (seeded by pacore.seed, the step and the sample's
own key; training draws afresh at iterations 1, 2, ...), rendered into the synthesis
template with the problem's images kept, and the synthesis is rolled out k times, all k with the same M.
The rewards score the synthesis's conclusion against the problem's answer.

Prompts with 0 < correct < k are written as shards with their whole pool (the problem as stored, not the
synthesis round), which `stage=pacore` trains on. `synthesis.jsonl` has every prompt's counts, the pool
entries it was given (`messages`, indices in reference order) and their mean reward (`message_reward`,
null when none carries one). Prompts the loader cannot give messages (no pool, or nothing usable in it:
`no_messages`; references over pacore.max_synthesis_tokens under over_budget=skip: `too_long`) are skipped
and counted. A response whose reward could not be computed counts for neither side. The last line printed
is a JSON summary, with the synthesis's accuracy beside the mean reward of the messages it was given.
"""

import json
import sys
from pathlib import Path

from rl.filtering import RolloutFilter, filter_parser, load_config, write_prompt
from step3vl_train.data.shards import ShardSetWriter


def main() -> None:
    parser = filter_parser(__doc__.splitlines()[0], 8, "synthesis rollouts per prompt")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/rl.yaml (with stage=pacore)")
    args = parser.parse_args()
    cfg = load_config("filter_synthesis.py", args.overrides)
    if cfg.stage != "pacore":
        sys.exit(f"filter_synthesis.py: rolls out PaCoRe synthesis rounds: give stage=pacore, not stage={cfg.stage}")
    rollouts = RolloutFilter(cfg, args.k, args.batch_prompts, args.solved_at, pacore=True)
    out = Path(args.out)
    writer = ShardSetWriter(str(out))
    correct = scored = 0
    message_rewards = []
    with (out / "synthesis.jsonl").open("w") as log:
        for group in rollouts.groups():
            prompt, given = group.prompt, group.prompt.synthesis
            row = {"key": prompt.key, "task": prompt.task, "correct": group.correct, "scored": group.scored,
                   "k": args.k, "kept": group.kept, "messages": given.indices, "message_reward": given.message_reward,
                   "dropped": given.dropped}  # fmt: skip
            log.write(json.dumps(row) + "\n")
            if group.kept:
                write_prompt(writer, prompt, prompt.pool)
            correct, scored = correct + group.correct, scored + group.scored
            if given.message_reward is not None:
                message_rewards.append(given.message_reward)
    writer.close()
    rollouts.close()
    summary = rollouts.summary()
    summary["synthesis_accuracy"] = correct / scored if scored else None
    summary["message_reward"] = sum(message_rewards) / len(message_rewards) if message_rewards else None
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
