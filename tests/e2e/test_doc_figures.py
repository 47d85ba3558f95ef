"""The check that keeps the docs' demo figures (`0.38<!--demo rlvr.reward.last-->`) what the demo produced
(tests/e2e/docs.py: quoted_figures, drifted); the walkthrough runs it on the demo's figures.json."""

import pytest

from tests.e2e.docs import DOCUMENTS, Figure, drifted, quoted_figures

DEMO = {"rlvr.reward.first": 0.0677, "rlvr.reward.last": 0.3802, "pretrain.phase2.tokens": 35282}


def test_a_drifted_figure_fails_the_check(tmp_path):
    doc = tmp_path / "rl.md"
    doc.write_text(
        "The reward rises from about 0.07<!--demo rlvr.reward.first-->\n"
        "to about 0.38<!--demo rlvr.reward.last-->, phase 2 from\n"
        "`phase phase2 from 35,282 tokens (it starts at 35,000)`<!--demo pretrain.phase2.tokens _-->.\n"
    )
    quoted = quoted_figures([doc])
    assert [(f.line, f.name, f.quoted) for f in quoted] == [
        (1, "rlvr.reward.first", "0.07"),
        (2, "rlvr.reward.last", "0.38"),
        (3, "pretrain.phase2.tokens", "35,282"),
    ]
    assert drifted(quoted, DEMO) == []
    doc.write_text(doc.read_text().replace("0.38", "0.72").replace("35,282", "37,313"))
    assert drifted(quoted_figures([doc]), DEMO) == [
        "rl.md:2: 0.72 (rlvr.reward.last): the demo gives 0.3802",
        "rl.md:3: 37,313 (pretrain.phase2.tokens): the demo gives 35282",
    ]


def test_a_figure_the_demo_does_not_produce_fails_the_check():
    figure = Figure("rl.md", 1, "rlvr.reward.middle", "0.2")
    assert drifted([figure], DEMO) == ["rl.md:1: 0.2 (rlvr.reward.middle): the demo produces no such figure"]


@pytest.mark.parametrize(
    "quoted,produced,holds",
    [
        ("0.38", 0.3802, True),
        ("0.38", 0.345, True),  # within 10%: another CPU's rounding may sample other rollouts
        ("0.38", 0.340, False),
        ("0.72", 0.42, False),  # docs/rlhf.md's RM score, had the demo's learning rate changed unnoticed
        ("0.05", 0.0599, True),  # one unit of the last digit, where that is wider than 10%
        ("0.05", 0.061, False),
        ("35,282", 35_283, True),
        ("35,282", 37_313, False),  # docs/training.md's drifted phase-2 start: a count holds to its last digit
        ("77%", 0.72, True),
        ("77%", 0.69, False),
        ("0.7M", 744960, True),
        ("0.7M", 1_200_000, False),
    ],
)
def test_a_measure_holds_to_ten_percent_and_a_count_to_its_last_digit(quoted, produced, holds):
    assert (drifted([Figure("doc.md", 1, "x", quoted)], {"x": produced}) == []) is holds


def test_a_tag_names_no_more_figures_than_there_are_numbers_before_it(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("phase2 rose to 0.38<!--demo rlvr.reward.first rlvr.reward.last-->\n")  # `phase2`: no number
    with pytest.raises(ValueError, match=r"doc.md:1: .* names 2 figures, \['0.38'\] before it"):
        quoted_figures([doc])


def test_the_docs_tag_the_figures_they_quote_from_the_demo():
    """Each doc with a demo paragraph quotes its figures tagged; the walkthrough compares them with the demo's."""
    quoted = quoted_figures(DOCUMENTS)
    by_document = {f.document for f in quoted}
    assert {"docs/training.md", "docs/rl.md", "docs/rlhf.md", "docs/pacore.md"} <= by_document, by_document
    names = {f.name for f in quoted}
    assert {"pretrain.phase2.tokens", "rlvr.reward.last", "rlhf.rm_score.last", "eval.pacore", "eval.sere"} <= names
