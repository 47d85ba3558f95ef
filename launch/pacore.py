r"""PaCoRe inference (spec 6.2): K parallel rollouts of each problem, compacted to their conclusions, then a
synthesis round that answers from the problem and those conclusions; pacore.rounds=[32,4] adds a round.

python launch/pacore.py model=/models/step3vl chat.backend=vllm data='/data/eval/*.tar' pacore.rounds=[16]
python launch/pacore.py chat.backend=openai chat.endpoint.base_url=http://policy:8000/v1 \
    chat.endpoint.model=stepfun-ai/Step3-VL-10B chat.tokenizer=/models/step3vl data=problems.jsonl
python launch/pacore.py model=outputs/demo/rlvr_hf chat.tokenizer=tiny data='outputs/demo/synthetic/rl/*.tar' \
    max_problems=8 pacore.rounds=[4] chat.max_new_tokens=64   # the CPU

model=DIR and data=PATHS are shortcuts for chat.model and data.paths. Images are planned with the processor
the model directory carries (an export: the one its run trained with); chat.processor=YAML overrides the
fields it sets. Problems are samples in the data schema (docs/data.md), each read once. Writes
OUT/results.jsonl (a line a problem: every round's conclusions, the references each synthesis was given, the
final answer and its reasoning; with a `reward` in the data, the rewards of the first round's rollouts and of
the synthesis) and OUT/summary.json, whose JSON is also the last line printed: SeRe's and PaCoRe's accuracy
side by side.
"""

import json
import sys

from omegaconf import DictConfig, OmegaConf

from step3vl_train.cli import expand_shortcuts, launch

SHORTCUTS = {"model": "chat.model", "data": "data.paths"}


def infer(cfg: DictConfig) -> None:
    from rl.chat_models import build_chat_model, pacore_tokenizer  # here: --help need not wait for torch
    from rl.pacore.inference import InferenceConfig, run_inference
    from step3vl_train.train.run_lock import RunLock
    from step3vl_train.usage import build

    config = build(InferenceConfig, OmegaConf.to_container(cfg, resolve=True))
    with RunLock(config.out):  # one run at a time appends to its results
        tokenizer = pacore_tokenizer(config.chat)
        model = build_chat_model(config.chat, "chat")
        try:
            summary = run_inference(config, model, tokenizer)
        finally:
            model.close()
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.argv[1:] = expand_shortcuts(sys.argv[1:], SHORTCUTS)
    launch(infer, "pacore", __doc__)
