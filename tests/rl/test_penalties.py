"""Behavioural penalties (rl/rewards/penalties.py): language, citations, over-confidence and their combination."""

import pytest

from rl.rewards.penalties import (
    CitationConfig,
    Penalties,
    PenaltyConfig,
    PenaltyReport,
    citations,
    language_scores,
    overconfidence,
)

SOURCES = "Use these sources.\n[1] Vaswani et al., Attention is all you need.\n[2] Devlin et al., BERT.\nQuestion: "


@pytest.mark.parametrize(
    ("question", "answer", "language", "switching"),
    [
        ("What is the capital of France?", "Paris is the capital.", 0.0, 0.0),
        ("What is the capital of France?", "法国的首都是巴黎。", 1.0, 0.0),  # English question, Chinese answer
        ("法国的首都是哪里？", "The capital is Paris.", 1.0, 0.0),  # Chinese question, English answer
        ("法国的首都是哪里？", "法国的首都是巴黎。", 0.0, 0.0),
        ("日本の首都はどこですか？", "日本の首都は東京です。", 0.0, 0.0),  # kanji with kana: Japanese, no switching
        ("日本の首都はどこですか？", "日本的首都是东京。", 1.0, 0.0),  # a Chinese answer (no kana) to Japanese
        ("What is the capital of Japan?", "東京です。", 1.0, 0.0),
        ("Какая столица России?", "Столица России — Москва.", 0.0, 0.0),
        ("What is the capital of Russia?", "Столица России — Москва.", 1.0, 0.0),
        ("What is this fruit?", "이것은 사과입니다", 1.0, 0.0),
        ("¿Qué fruta es?", "Es una manzana, ¿verdad?", 0.0, 0.0),  # accented Latin is Latin
        ("Name a fruit.", "An apple, or 苹果 in Chinese.", 0.0, 2 / 20),  # 18 Latin letters, 2 Han
        ("Name a fruit.", "Ａｐｐｌｅ 苹果", 0.0, 2 / 7),  # full-width Latin is Latin
        ("Name a fruit.", "苹果是 apple。", 0.0, 3 / 8),  # letters are counted: 5 Latin outweigh 3 Han
        ("解释这个链接", "请看 https://en.wikipedia.org/wiki/Apple 的说明。", 0.0, 0.0),  # a URL is no switching
        ("求解方程", r"答案是 $x = \frac{a}{b}$ 和 \(y = \sin t\)。", 0.0, 0.0),  # nor is LaTeX
        ("写一个函数", "用 `print(value)` 输出：\n```python\nprint(value)\n```", 0.0, 0.0),  # nor is code
        ("哪篇论文？", "见 arXiv:2401.01234 和 doi:10.1000/ABC。", 0.0, 0.0),  # nor are citations
        ("What is 2 + 2?", "", 0.0, 0.0),  # an empty answer
        ("What is 2 + 2?", "4", 0.0, 0.0),  # no letters
        ("2 + 2 = ?", "Four.", 0.0, 0.0),  # a question without letters has no script to differ from
    ],
)
def test_language_scores(question, answer, language, switching):
    assert language_scores(question, answer) == (language, pytest.approx(switching))


@pytest.mark.parametrize(
    ("text", "written"),
    [
        ("(see https://en.wikipedia.org/wiki/Foo_(bar)).", ["https://en.wikipedia.org/wiki/Foo_(bar)"]),
        ("[docs](https://a.io/b_(c)), **https://d.io/**", ["https://a.io/b_(c)", "https://d.io/"]),
        ("参见https://made.up/x。", ["https://made.up/x"]),
        ("(doi:10.1000/ABC).", ["doi:10.1000/ABC"]),
        ("https://doi.org/10.1000/abc and 10.1000/abc", ["https://doi.org/10.1000/abc"]),  # one DOI, once
        ("arXiv:2401.01234v2, 2401.01234 and arxiv 1706.03762", ["arXiv:2401.01234v2", "arxiv 1706.03762"]),
        ("hep-th/9901001 and math.AG/0501001v2", ["hep-th/9901001", "math.AG/0501001v2"]),
        ("arxiv.org/abs/2401.01234v3 and dx.doi.org/10.1000/abc", ["2401.01234v3", "10.1000/abc"]),  # no scheme
        ("3.14159, 1234.5678, 2401.0123, 2401.012345, 0612.1234, 2401.01234.5 and km/9901001", []),
        ("http://localhost:8000/api, https://example.com/x, http://127.0.0.1/ and http://svc.test/", []),
        ("As shown by Smith [3].", ["[3]"]),
        ("Both agree [2, 5]; see also [4].", ["[2]", "[5]", "[4]"]),
        ("研究表明[2]。", ["[2]"]),
        ("Attention is enough.[1]", ["[1]"]),
        ("[4] Some paper, 2020.", ["[4]"]),  # an entry of the answer's own list cites [4] too
        ("The box is [100, 200, 300, 400] and the list [1, 2, 3].", []),
        ("The point is at [120, 450], the pair [5, 2] and x = [1, 2].", []),  # over 99, descending, after "="
        ("a[3] and `refs[1]` and $[1, 2]$ and [0] and [[1, 2]]", []),  # indexing, code, math, zero, nested
        ("[1](https://example.org/a)", []),  # a link's label; its URL is a placeholder
    ],
)
def test_what_counts_as_a_citation(text, written):
    assert [citation.text for citation in citations(text)] == written


@pytest.mark.parametrize(
    ("question", "answer", "found", "fabricated"),
    [
        # a URL in the prompt cited back, with another scheme, no www. and a trailing slash
        ("Summarise https://www.nature.com/articles/x1", "See http://nature.com/articles/x1/.", 1, []),
        ("Summarise the source doi:10.1038/NATURE14539", "As 10.1038/nature14539 shows, ...", 1, []),  # DOI case
        ("Read arXiv:1706.03762v5.", "The transformer (1706.03762) and arxiv.org/abs/1706.03762v7", 1, []),
        ("Read https://arxiv.org/abs/1706.03762", "As arXiv:1706.03762v2 says", 1, []),
        ("Read hep-th/9711200.", "Maldacena (arXiv:hep-th/9711200v3)", 1, []),
        ("Read https://dl.acm.org/doi/10.1145/3292500.3330701", "doi:10.1145/3292500.3330701", 1, []),
        ("What is RLHF?", "See https://rlhf-facts.com/page.", 1, ["https://rlhf-facts.com/page"]),  # made up
        ("What is RLHF?", "See doi:10.9999/x and https://doi.org/10.9999/X.", 1, ["doi:10.9999/x"]),  # one DOI
        (SOURCES + "Compare them.", "Attention [1] and BERT [2].", 2, []),
        (SOURCES + "Compare them.", "Both use attention [1, 2], and more [3].", 3, ["[3]"]),  # beyond the list
        ("Compare attention and BERT.", "Attention does it [2].", 1, ["[2]"]),  # no list: unknown
        ("Find the cat.", "The cat is at [100, 200, 300, 400], near [120, 450].", 0, []),  # boxes, points
        ("What is 2 + 2?", "4", 0, []),
    ],
)
def test_citations_are_checked_against_the_prompt(question, answer, found, fabricated):
    report = Penalties(PenaltyConfig()).assess(question, answer)
    assert report.components["citations"] == found
    assert report.components["fabricated_citations"] == len(fabricated)
    assert report.fabricated == fabricated


@pytest.mark.parametrize(
    ("question", "answer", "fabricated"),
    [
        ("What is RLHF?", "See https://rlhf-facts.com/page.", []),  # unknown: not fabricated
        ("Compare attention and BERT.", "Attention does it [2].", []),  # no list in the prompt: unknown
        (SOURCES + "Compare them.", "More [3].", ["[3]"]),  # outside the prompt's list: fabricated all the same
    ],
)
def test_unknown_citations_can_be_tolerated(question, answer, fabricated):
    penalties = Penalties(PenaltyConfig(citation=CitationConfig(unknown_is_fabricated=False)))
    assert penalties.assess(question, answer).fabricated == fabricated


@pytest.mark.parametrize(
    ("answer", "fabricated"),
    [
        ("Per doi:10.1000/xyz123.", []),
        ("Per https://example-source.org/a and arXiv:2401.01234.", []),
        ("Per https://example-source.org/a#methods, hep-th/9901001v2", []),
        ("Per 10.1000/other and https://example-source.org/b", ["10.1000/other", "https://example-source.org/b"]),
    ],
)
def test_the_allowlist_verifies_citations(tmp_path, answer, fabricated):
    allowlist = tmp_path / "allowlist.txt"
    allowlist.write_text(
        "# sources we trust\n\n10.1000/XYZ123\nhttps://www.example-source.org/a/\n"
        "arXiv:2401.01234v2  # the survey\nhep-th/9901001\n"
    )
    penalties = Penalties(PenaltyConfig(citation=CitationConfig(allowlist=str(allowlist))))
    assert penalties.assess("What does the literature say?", answer).fabricated == fabricated


def test_a_bad_allowlist_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"citation\.allowlist.*missing\.txt"):
        Penalties(PenaltyConfig(citation=CitationConfig(allowlist=str(tmp_path / "missing.txt"))))
    allowlist = tmp_path / "allowlist.txt"
    allowlist.write_text("10.1000/ok\nthe attention paper\n")
    with pytest.raises(ValueError, match=r"citation\.allowlist .*allowlist\.txt:2: 'the attention paper'"):
        Penalties(PenaltyConfig(citation=CitationConfig(allowlist=str(allowlist))))
    with pytest.raises(ValueError, match="clip"):
        Penalties(PenaltyConfig(clip=(1.0, 0.0)))


@pytest.mark.parametrize(
    ("answer", "penalty"),
    [
        ("The answer is 4.", 0.0),
        ("It is definitely 4.", 0.5),
        ("It is definitely 4, without a doubt.", 1.0),
        ("Definitely, certainly and undoubtedly 4.", 1.0),  # capped at 1
        ("It is definitely 4, but I might be wrong.", 0.0),  # a hedge buys a marker back
        ("Definitely 4, without any doubt, though probably not 5.", 0.5),
        ("I'm absolutely sure it is 4.", 0.5),
        ("I am completely certain: 100% sure.", 1.0),
        ("It is almost certainly 4.", 0.0),
        ("It's not guaranteed, and there is no way to know.", 0.0),
        ("There is no way it is 5. It is guaranteed to be 4.", 1.0),
        ("I am not sure; it is definitely not 5.", 0.0),
        ("The meeting was in May 2024; it is certainly 4.", 0.5),  # the month is no hedge
        ("It is `definitely true` and $\\text{certainly}$.", 0.0),  # code and math are not claims
        ("答案肯定是4，毫无疑问。", 1.0),
        ("答案百分之百是4。", 0.5),
        ("答案可能是4。", 0.0),
        ("答案绝对是4，不过也许我错了。", 0.0),
        ("不可能是5，它的绝对值是3，我不肯定。", 0.0),  # 不可能, 绝对值 and 不肯定 are no claims
    ],
)
def test_overconfidence(answer, penalty):
    assert overconfidence(answer) == penalty


def test_assess_reports_every_component():
    report = Penalties(PenaltyConfig()).assess("What is 2 + 2?", "答案肯定是4, see https://made.up/sum")
    assert report.components == {
        "language": 1.0,
        "code_switching": pytest.approx(3 / 8),  # "see" against 答案肯定是
        "overconfidence": 0.5,
        "citations": 1.0,
        "fabricated_citations": 1.0,
    }
    assert report.fabricated == ["https://made.up/sum"]


def _report(fabricated=(), language=0.0, code_switching=0.0, overconfidence=0.0):
    components = {
        "language": language,
        "code_switching": code_switching,
        "overconfidence": overconfidence,
        "citations": float(len(fabricated)),
        "fabricated_citations": float(len(fabricated)),
    }
    return PenaltyReport(components, list(fabricated))


@pytest.mark.parametrize(
    ("config", "preference", "report", "expected"),
    [
        (PenaltyConfig(), 0.8, _report(), 0.8),
        (PenaltyConfig(), 0.8, _report(fabricated=["https://made.up"]), 0.0),  # zero on a fabricated citation
        (PenaltyConfig(fabricated_score=-1.0), 0.8, _report(fabricated=["[3]"]), -1.0),
        (PenaltyConfig(), 0.8, _report(language=1.0), 0.3),
        (PenaltyConfig(), 0.8, _report(code_switching=0.2), 0.7),
        (PenaltyConfig(), 0.8, _report(overconfidence=0.5), 0.7),
        (PenaltyConfig(), 0.8, _report(language=1.0, code_switching=0.2, overconfidence=0.5), 0.1),
        (PenaltyConfig(), 0.4, _report(language=1.0, overconfidence=1.0), 0.0),  # clipped below
        (PenaltyConfig(clip=(-1.0, 1.0)), 0.4, _report(language=1.0, overconfidence=1.0), -0.3),
        (PenaltyConfig(clip=(0.0, 0.9)), 1.0, _report(), 0.9),  # clipped above
        (PenaltyConfig(language_weight=0.0), 0.8, _report(language=1.0), 0.8),
    ],
)
def test_combine(config, preference, report, expected):
    assert Penalties(config).combine(preference, report) == pytest.approx(expected)
