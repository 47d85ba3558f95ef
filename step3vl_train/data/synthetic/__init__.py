"""A synthetic corpus with known ground truth, drawn with PIL: no download, deterministic by seed.

`drawing` makes the images; `tasks` turns them into pre-training documents, SFT conversations, RL and
RLHF prompts and preference pairs, and writes them as shards.
"""

from step3vl_train.data.synthetic.drawing import COLORS, SHAPES, draw_shapes
from step3vl_train.data.synthetic.tasks import TASKS, SyntheticSample, make_sample, write_corpus

__all__ = ["COLORS", "SHAPES", "TASKS", "SyntheticSample", "draw_shapes", "make_sample", "write_corpus"]
