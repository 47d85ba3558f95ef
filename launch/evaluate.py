r"""Scores a released-format checkpoint on a benchmark (docs/evaluation.md): SeRe and PaCoRe side by side,
each accuracy with a 95% confidence interval clustered by problem. The benchmark is configs/bench/NAME.yaml
(its prompt template, reward, samples a problem and reply lengths); its problems are samples in the data
schema (docs/data.md) read from shards, JSONL or a saved HF dataset.

python launch/evaluate.py model=/models/step3vl chat.backend=vllm bench=mathvision data=/data/mathvision.jsonl
python launch/evaluate.py chat.backend=openai chat.endpoint.base_url=http://policy:8000/v1 \
    chat.tokenizer=/models/step3vl bench=screenspot data='/data/screenspot/*.tar' modes=[sere]
python launch/evaluate.py model=outputs/demo/pacore_hf bench=synthetic \
    data='outputs/demo/synthetic/rl/heldout/choice/*.tar' modes=[sere,pacore] chat.tokenizer=tiny \
    chat.max_new_tokens=24 pacore.rounds=[8] out=outputs/demo/eval  # CPU

model=DIR and data=PATHS are shortcuts for chat.model and bench.data.paths. Images are planned with the
processor the model directory carries (an export: the one its run trained with); chat.processor=YAML
overrides the fields it sets. Writes OUT/NAME/results.jsonl (a line a problem and mode: every response with
its score) and OUT/NAME/summary.json, whose JSON is also the last line printed, after a table of the modes.
Rerun the same command after an interruption: problems already scored are not asked again.
"""

import json
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from step3vl_train.cli import expand_shortcuts, launch

SHORTCUTS = {"model": "chat.model", "data": "bench.data.paths"}


def score_checkpoint(cfg: DictConfig) -> None:
    from rl.chat_models import build_chat_model, pacore_tokenizer  # here: --help need not wait for torch
    from rl.evaluation.config import EvaluateConfig
    from rl.evaluation.run import evaluate, table
    from step3vl_train.train.run_lock import RunLock
    from step3vl_train.usage import build

    config = build(EvaluateConfig, OmegaConf.to_container(cfg, resolve=True))
    with RunLock(Path(config.out) / config.bench.name):  # one evaluation at a time appends to its results
        tokenizer = pacore_tokenizer(config.chat) if "pacore" in config.modes else None
        model = build_chat_model(config.chat, "chat")
        try:
            summary = evaluate(config, model, tokenizer)
        finally:
            model.close()
    print(table(summary))
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.argv[1:] = expand_shortcuts(sys.argv[1:], SHORTCUTS)
    launch(score_checkpoint, "evaluate", __doc__)
