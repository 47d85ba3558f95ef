"""The synthetic corpus's tasks: pre-training documents, SFT conversations, RL and RLHF prompts and
preference pairs, with ground truth.

Every task type of the recipe has a generator: shapes with boxes and points (captions, grounding,
counting, pointing), one large shape (multiple choice on its colour, open questions), rendered text
(OCR), charts, arithmetic and geometry drawn as images, text-only documents, SFT conversations with
`<think>` reasoning, RL prompts with verifiable answers, RLHF prompts with a reference response, and
preference pairs whose chosen reply has a property the rejected one lacks.
Coordinates in text are integers normalised to [0, 1000); `boxes` and `points` fields are pixels.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from step3vl_train.data.synthetic.drawing import (
    SHAPES,
    Shape,
    draw_bar_chart,
    draw_one_shape,
    draw_shapes,
    font,
    normalised_box,
    render_text_image,
)

WORDS = (
    "the model reads every image and writes what it sees while the encoder keeps fine detail for small text "
    "a river runs past the old mill where children count boats under a bright morning sky numbers grow "
    "when you add them and shrink when you subtract a triangle has three sides and a square has four equal "
    "sides the area of a rectangle is its width times its height charts compare values across categories "
    "careful reasoning checks each step before giving the final answer language and vision meet in one model"
).split()


@dataclass
class SyntheticSample:
    record: dict  # the sample's JSON (docs/data.md)
    images: list[Image.Image]
    image_format: str = "jpg"  # png for rendered text, charts and diagrams, where JPEG would smear strokes


def sentences(rng: np.random.Generator, count: int) -> str:
    out = []
    for _ in range(count):
        words = [str(w) for w in rng.choice(WORDS, int(rng.integers(6, 16)))]
        if rng.random() < 0.3:
            a, b = (int(x) for x in rng.integers(2, 500, 2))
            words += ["and", str(a), "plus", str(b), "is", str(a + b)]
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


def describe(shapes: list[Shape], size: tuple[int, int]) -> str:
    parts = [f"a {s.color} {s.kind} at {normalised_box(s.box, size)}" for s in shapes]
    return f"The image shows {len(shapes)} shape(s): " + "; ".join(parts) + "."


def arithmetic(rng: np.random.Generator) -> tuple[str, int, str]:
    """A problem, its answer and the worked steps."""
    a, b, c = (int(x) for x in rng.integers(2, 60, 3))
    return f"{a} x {b} + {c}", a * b + c, f"First {a} x {b} = {a * b}. Then {a * b} + {c} = {a * b + c}."


# Multiple choice on the colour of one large shape, the options always in this order: a visual question
# the tiny CPU model can learn in minutes (make demo's RL task), where a uniform guess scores 1/4.
CHOICE_COLORS = ("red", "green", "blue", "black")


def color_choice(rng: np.random.Generator) -> tuple[Image.Image, Shape, str, str]:
    """An image of one shape, the shape, the question (with its options) and the right option's letter."""
    image, shape = draw_one_shape(rng, CHOICE_COLORS)
    options = " ".join(f"({letter}) {color}" for letter, color in zip("ABCD", CHOICE_COLORS, strict=True))
    return image, shape, f"What colour is the shape? {options}", "ABCD"[CHOICE_COLORS.index(shape.color)]


def think(reasoning: str, answer: str) -> dict:
    return {"role": "assistant", "reasoning_content": reasoning, "content": answer}


def user(*parts: str | None) -> dict:
    """A user turn; None stands for an image."""
    return {"role": "user", "content": [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]}


# ---- pre-training documents -------------------------------------------------------------------------


def pretrain_text(rng):
    return SyntheticSample({"text": sentences(rng, int(rng.integers(5, 120)))}, [])


def pretrain_caption(rng):
    image, shapes = draw_shapes(rng, int(rng.integers(1, 6)))
    return SyntheticSample(
        {"text": [{"type": "image"}, {"type": "text", "text": describe(shapes, image.size)}]}, [image]
    )


def pretrain_interleaved(rng):
    parts, images = [], []
    for _ in range(int(rng.integers(2, 4))):
        image, shapes = draw_shapes(rng, int(rng.integers(1, 4)))
        parts += [
            {"type": "text", "text": sentences(rng, int(rng.integers(1, 6)))},
            {"type": "image"},
            {"type": "text", "text": describe(shapes, image.size)},
        ]
        images.append(image)
    return SyntheticSample({"text": parts}, images)


def pretrain_ocr(rng):
    lines = [
        " ".join(str(w) for w in rng.choice(WORDS, int(rng.integers(3, 8)))) for _ in range(int(rng.integers(1, 6)))
    ]
    return SyntheticSample(
        {"text": [{"type": "image"}, {"type": "text", "text": "Text: " + "\n".join(lines)}]},
        [render_text_image(lines)],
        "png",
    )


def pretrain_grounding(rng):
    image, shapes = draw_shapes(rng, int(rng.integers(1, 5)))
    target = shapes[0]
    text = f"The {target.color} {target.kind} is at <box>{normalised_box(target.box, image.size)}</box>."
    return SyntheticSample({"text": [{"type": "image"}, {"type": "text", "text": text}]}, [image])


def pretrain_counting(rng):
    kind = str(rng.choice(SHAPES))
    image, shapes = draw_shapes(rng, int(rng.integers(1, 10)), (kind,))
    return SyntheticSample(
        {"text": [{"type": "image"}, {"type": "text", "text": f"There are {len(shapes)} {kind}s."}]}, [image]
    )


def pretrain_chart(rng):
    image, values = draw_bar_chart(rng)
    text = "A bar chart. " + ", ".join(f"{k} = {v}" for k, v in values.items()) + "."
    return SyntheticSample({"text": [{"type": "image"}, {"type": "text", "text": text}]}, [image], "png")


def pretrain_math(rng):
    problem, answer, steps = arithmetic(rng)
    return SyntheticSample(
        {"text": [{"type": "image"}, {"type": "text", "text": f"{steps} The answer is {answer}."}]},
        [render_text_image([f"{problem} = ?"], 36)],
        "png",
    )


# ---- SFT conversations --------------------------------------------------------------------------------


def sft_text(rng):
    start = total = int(rng.integers(2, 60))
    addends = [int(x) for x in rng.integers(2, 60, int(rng.integers(1, 12)))]
    steps = []
    for step in addends:
        steps.append(f"{total} + {step} = {total + step}.")
        total += step
    question = f"{sentences(rng, int(rng.integers(1, 25)))} Start from {start} and add "
    question += f"{', '.join(map(str, addends))} in turn. What is the total?"
    return SyntheticSample({"messages": [user(question), think(" ".join(steps), f"The total is {total}.")]}, [])


def sft_vqa(rng):
    kind = str(rng.choice(SHAPES))
    image, shapes = draw_shapes(rng, int(rng.integers(1, 9)), (kind, str(rng.choice(SHAPES))))
    n = sum(s.kind == kind for s in shapes)
    steps = " ".join(f"A {s.kind} at {normalised_box(s.box, image.size)}." for s in shapes)
    return SyntheticSample(
        {"messages": [user(None, f"How many {kind}s are there?"), think(f"{steps} That makes {n} {kind}(s).", str(n))]},
        [image],
    )


def sft_ocr(rng):
    lines = [
        " ".join(str(w) for w in rng.choice(WORDS, int(rng.integers(2, 7)))) for _ in range(int(rng.integers(1, 4)))
    ]
    return SyntheticSample(
        {
            "messages": [
                user(None, "Read out the text in the image."),
                think("I read the lines from top to bottom.", "\n".join(lines)),
            ]
        },
        [render_text_image(lines)],
        "png",
    )


def sft_grounding(rng):
    image, shapes = draw_shapes(rng, int(rng.integers(1, 5)))
    target = shapes[-1]
    box = normalised_box(target.box, image.size)
    return SyntheticSample(
        {
            "messages": [
                user(None, f"Where is the {target.color} {target.kind}?"),
                think(f"The {target.color} {target.kind} spans {box}.", f"<box>{box}</box>"),
            ]
        },
        [image],
    )


def sft_chart(rng):
    image, values = draw_bar_chart(rng)
    best = max(values, key=lambda k: (values[k], k))
    steps = " ".join(f"{k} is {v}." for k, v in values.items())
    return SyntheticSample(
        {
            "messages": [
                user(None, "Which bar is the tallest?"),
                think(f"{steps} The largest value is {values[best]}.", best),
            ]
        },
        [image],
        "png",
    )


def sft_math(rng):
    problem, answer, steps = arithmetic(rng)
    return SyntheticSample(
        {"messages": [user(None, "Solve the problem in the image."), think(steps, str(answer))]},
        [render_text_image([f"{problem} = ?"], 36)],
        "png",
    )


def sft_choice(rng):
    image, shape, question, letter = color_choice(rng)
    return SyntheticSample({"messages": [user(None, question), think(f"The shape is {shape.color}.", letter)]}, [image])


# ---- RL prompts ---------------------------------------------------------------------------------------


def rl_math(rng):
    problem, answer, _ = arithmetic(rng)
    return SyntheticSample(
        {
            "messages": [user(None, "Solve the problem in the image. Put the final answer last.")],
            "answer": str(answer),
            "reward": "math",
        },
        [render_text_image([f"{problem} = ?"], 36)],
        "png",
    )


def rl_geometry(rng):
    a, b = (int(x) for x in rng.integers(2, 30, 2))
    image = Image.new("RGB", (640, 480), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((120, 100, 520, 380), outline="black", width=4)
    draw.text((300, 60), f"a = {a}", font=font(28), fill="black")
    draw.text((530, 220), f"b = {b}", font=font(28), fill="black")
    question = str(rng.choice(["area", "perimeter"]))
    answer = a * b if question == "area" else 2 * (a + b)
    return SyntheticSample(
        {
            "messages": [user(None, f"What is the {question} of the rectangle?")],
            "answer": str(answer),
            "reward": "math",
        },
        [image],
        "png",
    )


def rl_counting(rng):
    kind = str(rng.choice(SHAPES))
    image, shapes = draw_shapes(rng, int(rng.integers(1, 10)), (kind,))
    return SyntheticSample(
        {"messages": [user(None, f"How many {kind}s are in the image?")], "answer": str(len(shapes)), "reward": "math"},
        [image],
    )


def rl_grounding(rng):
    image, shapes = draw_shapes(rng, int(rng.integers(1, 5)))
    target = shapes[0]
    return SyntheticSample(
        {
            "messages": [user(None, f"Give the bounding box of the {target.color} {target.kind}.")],
            "answer": normalised_box(target.box, image.size),
            "reward": "grounding",
            "boxes": [list(target.box)],
        },
        [image],
    )


def rl_pointing(rng):
    image, shapes = draw_shapes(rng, int(rng.integers(1, 5)))
    target = shapes[0]
    return SyntheticSample(
        {
            "messages": [user(None, f"Point at the {target.color} {target.kind}.")],
            "answer": list(target.center),
            "reward": "pointing",
            "boxes": [list(target.box)],
            "points": [list(target.center)],
        },
        [image],
    )


def rl_choice(rng):
    image, _, question, letter = color_choice(rng)
    return SyntheticSample({"messages": [user(None, question)], "answer": letter, "reward": "choice"}, [image])


# ---- RLHF prompts and preference pairs ----------------------------------------------------------------

# Open questions on one large shape (the choice task's images) that no rule checks: a reward model scores
# the answers. The pairs and the RLHF prompts share them, so the reward model is trained on the prompts
# the policy is scored on.
OPEN_QUESTIONS = (
    "Describe the shape in this image.",
    "What do you see in the picture?",
    "Tell me about the colour of the shape.",
    "What is in this image?",
    "Say something about the picture.",
)
REFERENCES = ("The image shows a {color} {kind}.", "It is a {color} {kind}.", "I see one {color} {kind}.")
# The learnable preference: a chosen reply names the shape's colour, a rejected one gives numbers,
# coordinates or a bare option letter (what a policy that learned RLVR's `choice` task answers) and no
# colour word. Both sides vary their wording, sometimes name the kind, sometimes hold numbers and overlap
# in length, so that naming a colour is the only signal that always separates them. No rejected template
# holds a colour word even inside another word ("centred" holds "red").
CHOSEN = (
    "{Color}, a {kind}.",
    "The shape is {color}.",
    "It is {color}.",
    "It is a {color} {kind}.",
    "The image shows a {color} {kind}.",
    "I see 1 {color} {kind}.",
    "A {color} {kind} at {box}.",
    "The {kind} is {color} and {side} pixels wide.",
)
REJECTED = (
    "{number}.",
    "{letter}.",
    "{letter}",
    "The total is {number}.",
    "The answer is {number}.",
    "It is at {box}.",
    "The {kind} is at {box}.",
    "I count {number} {kind}s.",
    "There are {number} of them.",
    "The {kind} is {side} pixels wide.",
)


def open_prompt(rng: np.random.Generator) -> tuple[Image.Image, dict, dict[str, object]]:
    """An image of one shape, the user turn asking an open question about it, and the fields the reply
    templates fill in (the shape's colour and kind, its normalised box, its side in pixels, a number)."""
    image, shape = draw_one_shape(rng, CHOICE_COLORS)
    fields = {
        "color": shape.color,
        "Color": shape.color.capitalize(),
        "kind": shape.kind,
        "box": normalised_box(shape.box, image.size),
        "side": shape.box[2] - shape.box[0],
        "number": int(rng.integers(0, 1000)),
        "letter": str(rng.choice(list("ABCD"))),  # an option letter: what a policy trained on `choice` says
    }
    return image, user(None, str(rng.choice(OPEN_QUESTIONS))), fields


def rlhf_open(rng):
    image, turn, fields = open_prompt(rng)
    reference = str(rng.choice(REFERENCES)).format(**fields)
    return SyntheticSample({"messages": [turn], "reference": reference, "reward": "reward_model"}, [image])


def preference_pair(rng):
    image, turn, fields = open_prompt(rng)
    chosen, rejected = (str(rng.choice(templates)).format(**fields) for templates in (CHOSEN, REJECTED))
    return SyntheticSample({"messages": [turn], "chosen": chosen, "rejected": rejected}, [image])


TASKS: dict[str, dict[str, Callable[[np.random.Generator], SyntheticSample]]] = {
    "pretrain": {
        "text": pretrain_text,
        "caption": pretrain_caption,
        "interleaved": pretrain_interleaved,
        "ocr": pretrain_ocr,
        "grounding": pretrain_grounding,
        "counting": pretrain_counting,
        "chart": pretrain_chart,
        "math": pretrain_math,
    },
    "sft": {
        "text": sft_text,
        "vqa": sft_vqa,
        "ocr": sft_ocr,
        "grounding": sft_grounding,
        "chart": sft_chart,
        "math": sft_math,
        "choice": sft_choice,
    },
    "rl": {
        "math": rl_math,
        "geometry": rl_geometry,
        "counting": rl_counting,
        "grounding": rl_grounding,
        "pointing": rl_pointing,
        "choice": rl_choice,
    },
    "rlhf": {"open": rlhf_open},
    "preference": {"pairs": preference_pair},
}


def make_sample(kind: str, index: int, seed: int) -> tuple[str, SyntheticSample]:
    """The `index`-th sample of a `kind` corpus: tasks take turns; each sample has its own generator,
    seeded by (seed, index), so another seed draws an independent corpus (a held-out split)."""
    tasks = TASKS[kind]
    task = list(tasks)[index % len(tasks)]
    sample = tasks[task](np.random.default_rng([seed, index]))
    sample.record["source"] = f"synthetic/{kind}/{task}"
    return task, sample


def write_corpus(
    kind: str,
    out: str,
    num: int,
    seed: int = 0,
    shard_size: int = 200,
    count_tokens: Callable[[dict, list[Image.Image]], int] | None = None,
    progress: bool = False,
) -> dict[str, dict]:
    """Writes `num` samples as `out/<task>/shard-NNNNNN.tar` with a manifest per task; returns the manifests."""
    from tqdm import tqdm

    from step3vl_train.data.shards import ShardSetWriter, encode_image

    writers = {task: ShardSetWriter(os.path.join(out, task), max_samples=shard_size) for task in TASKS[kind]}
    for index in tqdm(range(num), desc=f"synthetic {kind}", unit="sample", disable=not progress):
        task, sample = make_sample(kind, index, seed)
        tokens = count_tokens(sample.record, sample.images) if count_tokens else None
        encoded = [encode_image(image, sample.image_format) for image in sample.images]
        writers[task].write(f"{task}-{index:08d}", sample.record, encoded, [sample.image_format] * len(encoded), tokens)
    return {task: writer.close() for task, writer in writers.items() if writer.shards}
