import time

import pytest

from rl.rewards import RewardConfig, RewardRequest, RewardScorer
from rl.rewards.answer import boxed_contents, split_reasoning

T = "Some reasoning.</think>"


@pytest.fixture(scope="module")
def scorer():
    scorer = RewardScorer(RewardConfig(num_workers=2, timeout_s=5.0))
    yield scorer
    scorer.close()


def score(scorer, response, reward, answer=None, **fields):
    [result] = scorer.score([RewardRequest(response, reward, answer=answer, **fields)])
    return result.score, result.status


MATH = [
    (T + r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    (T + r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (T + r"\boxed{\frac{2}{4}}", "1/2", 1.0),
    (T + r"\boxed{0.333}", "1/3", 0.0),
    (T + r"\boxed{5\text{ cm}}", "5", 1.0),
    (T + r"\boxed{5 cm}", "5", 1.0),
    (T + r"\boxed{(1, 2]}", "(1,2]", 1.0),
    (T + r"\boxed{[1, 2]}", "(1,2]", 0.0),
    (T + r"\boxed{x = 2}", "2", 1.0),
    (T + r"The answer is \frac{3}{4}.", "0.75", 1.0),
    (T + "so it is 1579", "1579", 1.0),
    (T + r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", 1.0),
    (r"\boxed{7}</think>\boxed{8}", "7", 0.0),  # only the text after the last </think> answers
    (T + r"\boxed{1,000}", "1000", 1.0),
]


@pytest.mark.parametrize(("response", "answer", "expected"), MATH)
def test_math_equivalences(scorer, response, answer, expected):
    assert score(scorer, response, "math", answer) == (expected, "ok")


@pytest.mark.parametrize(
    ("response", "status"),
    [
        (T + r"\boxed{3} or \boxed{4}", "multiple_answers"),
        (T + r"\boxed{3", "no_answer"),  # never closed
        (T + r"\boxed{}", "no_answer"),
        (T + "   ", "no_answer"),
        (r"\boxed{3}", "no_reasoning"),  # no </think>
        (r"</think>\boxed{3}", "no_reasoning"),  # nothing before it
    ],
)
def test_math_guards(scorer, response, status):
    assert score(scorer, response, "math", "3") == (0.0, status)


def test_truncated_response_scores_the_configured_value(scorer):
    assert score(scorer, T + r"\boxed{3}", "math", "3", truncated=True) == (0.0, "truncated")


def test_without_a_truncated_score_a_truncated_response_meets_its_reward():
    """`reward.truncated_score: null`: scored as any other response, the other guards included."""
    scorer = RewardScorer(RewardConfig(num_workers=1, truncated_score=None))
    try:
        assert score(scorer, T + r"\boxed{3}", "math", "3", truncated=True) == (1.0, "ok")
        assert score(scorer, T + r"\boxed{4}", "math", "3", truncated=True) == (0.0, "ok")
        assert score(scorer, r"\boxed{3}", "math", "3", truncated=True) == (0.0, "no_reasoning")
    finally:
        scorer.close()


def test_reasoning_is_optional_when_configured():
    scorer = RewardScorer(RewardConfig(num_workers=1, require_reasoning=False))
    try:
        assert score(scorer, r"\boxed{3}", "math", "3") == (1.0, "ok")
    finally:
        scorer.close()


@pytest.mark.parametrize(
    ("reward", "response", "answer", "expected"),
    [
        ("choice", T + "B", "B", 1.0),
        ("choice", T + "(c)", "C", 1.0),
        ("choice", T + r"\boxed{D}", "D", 1.0),
        ("choice", T + "B. a cat", "B", 1.0),
        ("choice", T + "A", "B", 0.0),
        ("counting", T + "There are 7.", "7", 1.0),
        ("counting", T + "seven", "7", 1.0),
        ("counting", T + r"\boxed{12}", "12", 1.0),
        ("counting", T + "3 then 4", "3", 0.0),
        ("numeric", T + "about 3.14", "3.1416", 1.0),  # within the default 1% relative tolerance
        ("numeric", T + "1,234.5", "1234", 1.0),
        ("numeric", T + "3.3", "3.1416", 0.0),
        ("numeric", T + "-2e3", "-2000", 1.0),
    ],
)
def test_choice_counting_and_numeric(scorer, reward, response, answer, expected):
    assert score(scorer, response, reward, answer) == (expected, "ok")


IMAGE = (1000, 500)
BOX = [[100, 100, 300, 200]]  # pixels


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (T + "<box>[100, 200, 300, 400]</box>", 1.0),  # 0-1000 normalised: x by 1000 px, y by 500 px
        (T + "[100, 200, 300, 400] and [500, 500, 600, 600]", 0.5),  # an extra box halves it
        (T + "[100, 200, 200, 400]", 0.5),  # IoU 0.5: at the threshold, scores its IoU
        (T + "[100, 200, 180, 400]", 0.0),  # IoU 0.4: below the threshold
        (T + "[300, 200, 100, 400]", 0.0),  # inverted
        (T + "[1100, 200, 1300, 400]", 0.0),  # off the image
    ],
)
def test_grounding_iou_in_normalised_coordinates(scorer, response, expected):
    result = score(scorer, response, "grounding", boxes=BOX, image_size=IMAGE)
    assert result[1] == "ok"
    assert result[0] == pytest.approx(expected)


def test_grounding_threshold_and_pixel_coordinates():
    options = {"grounding": {"coords": "pixels", "iou_threshold": 0.3}}
    scorer = RewardScorer(RewardConfig(num_workers=1, options=options))
    try:
        # half the reference box: IoU 0.5, above 0.3, scores its IoU
        assert score(scorer, T + "[100, 100, 200, 200]", "grounding", boxes=BOX, image_size=IMAGE) == (0.5, "ok")
        assert score(scorer, T + "[100, 100, 150, 200]", "grounding", boxes=BOX, image_size=IMAGE) == (0.0, "ok")
        assert score(scorer, T + "[1, 2, 3]", "grounding", boxes=BOX, image_size=IMAGE) == (0.0, "no_answer")
    finally:
        scorer.close()


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (T + "(200, 300)", 1.0),  # the centre, normalised: (200 px, 150 px)
        (T + "[200, 300]", 1.0),
        (T + "(250, 300)", pytest.approx(1 - 50 / (223.6068 / 2), abs=1e-4)),
        (T + "(400, 300)", 0.0),  # beyond half the box diagonal
        (T + "(1200, 300)", 0.0),  # off the image
    ],
)
def test_pointing_decays_with_distance(scorer, response, expected):
    fields = {"boxes": BOX, "points": [[200, 150]], "image_size": IMAGE}
    assert score(scorer, response, "pointing", **fields) == (expected, "ok")


# Answers as models write them, scored against two reference boxes and points of a square image, where
# 0-1000 normalised coordinates are pixels.
SQUARE = (1000, 1000)
CATS = [[100, 100, 300, 300], [500, 500, 700, 800]]
QWEN_BOXES = """```json
[
  {"bbox_2d": [500, 500, 700, 800], "label": "cat 2"},
  {"bbox_2d": [100, 100, 300, 300], "label": "cat 1"}
]
```"""


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (T + QWEN_BOXES, 1.0),  # Qwen2.5-VL: fenced JSON, digits in keys and labels are not coordinates
        (T + '{"bbox_2d": [100, 100, 300, 300], "label": "cat"}', 0.5),  # one of two cats
        (T + "<box>[[100,100,300,300],[500,500,700,800]]</box>", 1.0),  # InternVL, nested, no spaces
        (T + "[100,100,300,300]", 0.5),  # no spaces: four coordinates, not one number with thousands commas
        (T + "[100, 100, 300, 300]\n[500, 500, 700, 800]", 1.0),  # one a line: every line is read
        (T + "There are 2 cats:\n1. [100, 100, 300, 300]\n2. [500, 500, 700, 800]", 1.0),  # prose numbers
        (T + "The first cat [500, 500, 700, 800], the second [100, 100, 300, 300].", 1.0),  # any order
        (T + "[100 100 300 300] [500 500 700 800]", 1.0),  # space-separated
        (T + "{'bbox_2d': [100, 100, 300, 300]}, {'bbox_2d': [500, 500, 700, 800]}", 1.0),  # a Python repr
        (T + "I first thought [0, 0, 50, 50].\n\\boxed{[100, 100, 300, 300], [500, 500, 700, 800]}", 1.0),
        (T + "Steps [1, 2, 3] give [100, 100, 300, 300] and [500, 500, 700, 800]", 1.0),  # 3 numbers: no box
        (T + "[100, 100, 300, 300] [500, 500, 700, 800] [0, 0, 10, 10]", pytest.approx(2 / 3)),  # an extra
        (T + "[100, 100, 300, 300, 500]", None),  # five numbers are no box
        (T + "The cats are at (200, 200) and (600, 650).", None),  # points are no boxes
    ],
)
def test_grounding_reads_boxes_as_models_write_them(scorer, response, expected):
    result = score(scorer, response, "grounding", boxes=CATS, image_size=SQUARE)
    assert result == ((expected, "ok") if expected is not None else (0.0, "no_answer"))


@pytest.mark.parametrize(
    ("boxes", "references", "expected"),
    [
        # Greedy matching gives the first box its best reference (IoU 0.36, below the threshold) and leaves
        # the second an IoU of 0.05; the optimal pairing scores the second's 0.76.
        ([[400, 0, 700, 200], [200, 50, 700, 300]], [[150, 0, 700, 300], [550, 200, 900, 750]], 0.7576 / 2),
        # Maximising raw IoU pairs both boxes below the threshold (0.42 + 0.47); the scores pair one above it.
        ([[50, 100, 600, 600], [50, 0, 500, 450]], [[200, 0, 600, 550], [0, 250, 400, 600]], 0.5714 / 2),
    ],
)
def test_grounding_pairs_boxes_by_optimal_assignment(scorer, boxes, references, expected):
    response = T + " ".join(str(box) for box in boxes)
    result = score(scorer, response, "grounding", boxes=references, image_size=SQUARE)
    assert result == (pytest.approx(expected, abs=1e-4), "ok")


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (T + "(200, 200)\n(600, 650)", 1.0),  # two points, one a line
        (T + '[{"point_2d": [600, 650], "label": "cat 2"}, {"point_2d": [200, 200], "label": "cat 1"}]', 1.0),
        (T + "[200,200]", 0.5),  # one of two
        (T + "(200, 200) (600, 650) (900, 100)", pytest.approx(2 / 3)),  # an extra point
        (T + "(200, 200) (600, 700)", pytest.approx((1 + 1 - 50 / (360.5551 / 2)) / 2, abs=1e-4)),
        (T + "There are 2 cats, at \\boxed{(200, 200), (600, 650)}", 1.0),
        (T + "[100, 100, 300, 300]", None),  # a box is no point
    ],
)
def test_pointing_at_several_targets(scorer, response, expected):
    fields = {"boxes": CATS, "points": [[200, 200], [600, 650]], "image_size": SQUARE}
    assert score(scorer, response, "pointing", **fields) == (
        (expected, "ok") if expected is not None else (0.0, "no_answer")
    )


@pytest.mark.parametrize(
    ("reward", "fields", "match"),
    [
        ("grounding", {"boxes": []}, "reference boxes"),
        ("pointing", {"boxes": CATS, "points": [[200, 200]]}, "1 points, 2 boxes"),
    ],
)
def test_grounding_data_without_usable_references_is_an_error(scorer, reward, fields, match):
    [result] = scorer.score([RewardRequest(T + "[100, 100, 300, 300] (200, 200)", reward, image_size=SQUARE, **fields)])
    assert result.status == "error" and match in result.detail


def test_user_reward_by_import_path(scorer):
    assert score(scorer, T + "yes", "tests.rl.user_rewards:exact", "yes") == (1.0, "ok")
    assert score(scorer, T + "yes", "no_such_module:fn", "yes")[1] == "error"


def test_a_hanging_reward_is_a_timeout_and_the_pool_goes_on():
    scorer = RewardScorer(RewardConfig(num_workers=2, timeout_s=1.0))
    try:
        started = time.monotonic()
        requests = [
            RewardRequest(T + "x", "tests.rl.user_rewards:hang"),
            RewardRequest(T + "x", "tests.rl.user_rewards:crash"),
            RewardRequest(T + "x", "tests.rl.user_rewards:out_of_range"),
            RewardRequest(T + r"\boxed{4}", "math", answer="4"),
        ]
        results = scorer.score(requests)
        assert time.monotonic() - started < 10
        assert [r.status for r in results] == ["timeout", "error", "error", "ok"]
        assert [r.valid for r in results] == [False, False, False, True]
        assert scorer.score([RewardRequest(T + r"\boxed{4}", "math", answer="4")])[0].score == 1.0
    finally:
        scorer.close()


def test_config_fn_overrides_every_sample():
    scorer = RewardScorer(RewardConfig(num_workers=1, fn="tests.rl.user_rewards:exact"))
    try:
        assert score(scorer, T + "7", "math", "7") == (1.0, "ok")
    finally:
        scorer.close()


def test_answer_helpers():
    assert split_reasoning("a</think>b</think>c") == ("a</think>b", "c")
    assert boxed_contents(r"\boxed{\frac{1}{2}} and \boxed{x^{2}}") == [r"\frac{1}{2}", "x^{2}"]
