"""Reading boxes and points out of answer text (rl/rewards/coordinates.py)."""

import numpy as np
import pytest

from rl.rewards.coordinates import answer_coordinates, coordinate_lists
from rl.rewards.grounding import matched_score
from rl.rewards.types import NoAnswerError, RewardRequest

BOX_A, BOX_B = [10.0, 20.0, 30.0, 40.0], [50.0, 60.0, 70.0, 80.0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[10,20,30,40]", [BOX_A]),  # commas separate coordinates, never thousands
        ("[10, 20, 30, 40]", [BOX_A]),
        ("[10 20 30 40]", [BOX_A]),
        ("[[10,20,30,40],[50,60,70,80]]", [BOX_A, BOX_B]),
        ("<box>[[10, 20, 30, 40]]</box>", [BOX_A]),
        ('{"bbox_2d": [10, 20, 30, 40], "label": "cat 3"}', [BOX_A]),
        ('```json\n[{"bbox": [10, 20, 30, 40]}, {"bbox": [50, 60, 70, 80]}]\n```', [BOX_A, BOX_B]),
        ('{"point_2d": [200, 200]}', [[200.0, 200.0]]),  # the 2 of point_2d is no coordinate
        ("{point_2d: [200, 200]}", [[200.0, 200.0]]),  # not JSON: read as a bracketed list
        ("{'bbox_2d': [10, 20, 30, 40]}", [BOX_A]),  # a Python repr
        ("(200, 300)", [[200.0, 300.0]]),
        ("(10, 20, 30, 40)", [BOX_A]),
        ("[-5, 2.5]", [[-5.0, 2.5]]),
        ("There are 2 cats: [10, 20, 30, 40] and\n[50, 60, 70, 80].", [BOX_A, BOX_B]),
        ("[1, 2, 3] [1, 2, 3, 4, 5] [10, 20, 30, 40, 50, 60, 70, 80]", []),  # 3, 5 and 8 numbers
        ("[[10, 20, 30, 40], 7, [1, 2, 3]]", [BOX_A]),
        ("[NaN, 20, 30, 40] [Infinity, 1]", []),  # JSON reads these; they are no coordinates
        ("x1 = 10, y1 = 20, (see step 3)", []),
        ("[10, 20, 30", []),
    ],
)
def test_coordinate_lists(text, expected):
    assert coordinate_lists(text) == expected


def test_the_boxed_answer_is_read_where_it_holds_coordinates():
    reasoned = "Look: [0, 0, 5, 5] is wrong.</think>"
    request = RewardRequest(reasoned + r"Not [1, 1, 2, 2] but \boxed{[10, 20, 30, 40]}", "grounding")
    assert answer_coordinates(request, 4) == [BOX_A]
    request = RewardRequest(reasoned + r"\boxed{2} cats: [10, 20, 30, 40] and [50, 60, 70, 80]", "grounding")
    assert answer_coordinates(request, 4) == [BOX_A, BOX_B]
    with pytest.raises(NoAnswerError, match="no point"):
        answer_coordinates(RewardRequest(reasoned + "[10, 20, 30, 40]", "pointing"), 2)
    with pytest.raises(NoAnswerError, match="no box"):
        answer_coordinates(RewardRequest("[10, 20, 30, 40]</think>none", "grounding"), 4)  # only the final answer


def test_matched_score_is_the_best_pairing_over_the_larger_count():
    assert matched_score(np.array([[0.6, 0.9], [0.0, 0.8]])) == pytest.approx((0.6 + 0.8) / 2)
    assert matched_score(np.array([[1.0, 0.0, 0.0]])) == pytest.approx(1 / 3)  # two references missed
    assert matched_score(np.array([[0.0], [1.0], [0.0]])) == pytest.approx(1 / 3)  # two extra predictions
