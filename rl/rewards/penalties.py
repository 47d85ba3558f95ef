"""Behavioural penalties on a final answer (spec 5.4): language consistency, citation verification, over-confidence.

Every rule reads text only: no network, no language-id model, so a penalty is the same on every host and run.

Language. Each letter (Unicode category L*) belongs to the script its character name starts with (LATIN, CJK,
HANGUL, CYRILLIC, ...; see SCRIPTS); digits, punctuation, symbols and letters of no listed script are ignored, and so
are URLs, DOIs, arXiv ids, code in backticks and LaTeX math (`$...$`, `$$...$$`, `\\(...\\)`, `\\[...\\]`), since a
formula or a link is not a change of language. Where a text holds kana, its Han and kana count together as Japanese,
so kanji in Japanese is not switching. `language` is 1.0 when the answer's dominant script (most letters; a tie goes
to the first seen) differs from the question's, else 0.0; `code_switching` is the share of the answer's letters
outside its dominant script. Letters are counted, not words: a Han character weighs as much as a Latin letter, so a
Chinese answer naming long English terms leans Latin sooner than a reader would say. A text without letters has no
script and scores 0 on both.

Citations. What the answer cites:
- URLs (http/https; trailing punctuation and an unbalanced closing bracket stripped). A doi.org URL is its DOI, an
  arxiv.org/abs|pdf URL its arXiv id. Placeholder hosts (localhost, loopback, example.com/.org/.net and the reserved
  .test/.example/.invalid/.localhost names) are no citation.
- DOIs `10.NNNN/...` (an optional `doi:` prefix), compared case-blind.
- arXiv ids, optionally prefixed `arXiv:`, compared without their version: new style YYMM.NNNNN (four digits after
  the dot for 0704-1412, five from 1501 on) not inside a longer number, and old style archive/YYMMNNN for the
  archives of ARXIV_ARCHIVES (a subject class such as math.AG/ is dropped). A bare number of that exact shape
  (1203.5678) reads as an id too: the price of catching ids written without their prefix.
- Numbered references: `[n]` or `[n, m]` in prose (outside code and math), 1 <= n < m <= MAX_REFERENCE, at the start
  of a line, or after a letter or one of `.,;:)!?` (a space is required after an ASCII letter, so `a[3]` indexes
  and is no citation), and not followed by `(` (a markdown link's label; its URL is checked). So `[1, 2, 3]`, boxes
  `[100, 200, 300, 400]`, points over MAX_REFERENCE, descending pairs, `[0]` and `x = [1, 2]` are not references.
  `[n, m]` cites `[n]` and `[m]`.
URLs, DOIs and arXiv ids count anywhere, code included: a link is a claim wherever it is written. Each citation
counts once (by its normalised form), in the order first written. A link is verified when the question (the whole
prompt text, with its sources; DOIs and arXiv ids inside its URLs count too) or the allowlist holds it; URLs compare
without scheme, `www.`, fragment or trailing slash, host case-blind. `[n]` is checked against the question's
numbered list (lines that start with `[n]`): with a list, an n outside it is fabricated; without one, `[n]` is
unknown. An unknown citation is fabricated when `citation.unknown_is_fabricated`.

Over-confidence. A rule, not the judge's template: the certainty markers of CERTAINTY_MARKERS in the answer's prose,
less its hedges (HEDGES), each occurrence counted, give min(1, max(0, markers - hedges) / 2): one unhedged
absolute claim costs half, two or more cost all, and a hedge buys one back.

`Penalties.combine`: `fabricated_score` when any citation is fabricated, else
clip(preference - language_weight * language - code_switching_weight * code_switching
- overconfidence_weight * overconfidence, *clip).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote, urlsplit

# The first word of a letter's Unicode name (after FULLWIDTH / HALFWIDTH) -> its script.
SCRIPTS = {
    "LATIN": "Latin", "CJK": "Han", "IDEOGRAPHIC": "Han", "HIRAGANA": "Kana", "KATAKANA": "Kana",
    "KATAKANA-HIRAGANA": "Kana", "HANGUL": "Hangul", "CYRILLIC": "Cyrillic", "ARABIC": "Arabic", "GREEK": "Greek",
    "DEVANAGARI": "Devanagari", "THAI": "Thai", "HEBREW": "Hebrew", "ARMENIAN": "Armenian", "GEORGIAN": "Georgian",
    "BENGALI": "Bengali", "GURMUKHI": "Gurmukhi", "GUJARATI": "Gujarati", "ORIYA": "Oriya", "TAMIL": "Tamil",
    "TELUGU": "Telugu", "KANNADA": "Kannada", "MALAYALAM": "Malayalam", "SINHALA": "Sinhala", "LAO": "Lao",
    "TIBETAN": "Tibetan", "MYANMAR": "Myanmar", "KHMER": "Khmer", "ETHIOPIC": "Ethiopic", "MONGOLIAN": "Mongolian",
}  # fmt: skip

# Old-style arXiv archives (identifiers archive/YYMMNNN, 1991-2007).
ARXIV_ARCHIVES = (
    "acc-phys", "adap-org", "alg-geom", "ao-sci", "astro-ph", "atom-ph", "bayes-an", "chao-dyn", "chem-ph", "cmp-lg",
    "comp-gas", "cond-mat", "cs", "dg-ga", "funct-an", "gr-qc", "hep-ex", "hep-lat", "hep-ph", "hep-th", "math-ph",
    "math", "mtrl-th", "nlin", "nucl-ex", "nucl-th", "patt-sol", "physics", "plasm-ph", "q-alg", "q-bio", "quant-ph",
    "solv-int", "supr-con",
)  # fmt: skip
MAX_REFERENCE = 99  # the largest n read as a numbered reference [n]; larger numbers are values or coordinates

CERTAINTY_MARKERS = (
    r"\bdefinitely\b",
    r"(?<!almost )\bcertainly\b",
    r"\bundoubtedly\b",
    r"\bwithout (?:a|any) doubt\b",
    r"(?<!\d)100 ?% (?:sure|certain)\b",
    r"(?<!not )\bguaranteed\b",
    r"\bI(?: am|['’]m) (?:absolutely|completely) (?:sure|certain)\b",
    r"\bthere(?: is|['’]s) no way\b(?! to\b)",  # "there is no way to know" hedges
    r"\balways correct\b",
    r"(?<!不)肯定",
    r"绝对(?!值|误差|温度|路径|坐标|位置)",  # 绝对值 is the absolute value, not a claim
    r"毫无疑问",
    r"百分之百",
)
HEDGES = (
    r"\bmight\b",
    r"\bmay\b(?! \d)",  # not the month in "May 2024"
    r"\blikely\b",
    r"\bprobably\b",
    r"\bperhaps\b",
    r"\bpossibly\b",
    r"\bI think\b",
    r"\bnot (?:entirely |completely |totally |absolutely )?(?:sure|certain)\b",
    r"\buncertain\b",
    r"(?<!不)可能",  # 不可能 ("impossible") is no hedge
    r"也许",
    r"或许",
    r"大概",
    r"不确定",
    r"不肯定",
)
CERTAINTY = re.compile("|".join(CERTAINTY_MARKERS), re.IGNORECASE)
HEDGING = re.compile("|".join(HEDGES), re.IGNORECASE)

_NOT_URL = "\\s<>\"'`{}|\\\\^\u3000-\u303f\uff00-\uffef"  # whitespace, delimiters, CJK and full-width punctuation
URL = re.compile(rf"https?://[^{_NOT_URL}]+", re.IGNORECASE)
DOI = re.compile(r"(?<![\w.])(?:doi:\s*)?(10\.\d{4,9}/[-._;()/:A-Za-z0-9+]+)", re.IGNORECASE)
_ARXIV_PREFIX = r"(?:\barxiv\s*:?\s*|(?<![\w.\-]))"
ARXIV_NEW = re.compile(rf"{_ARXIV_PREFIX}((\d{{2}})(\d{{2}})\.(\d{{4,5}}))(v\d+)?(?!\w|\.\d)", re.IGNORECASE)
ARXIV_OLD = re.compile(
    rf"{_ARXIV_PREFIX}((?:{'|'.join(ARXIV_ARCHIVES)})(?:\.[A-Za-z]{{2}})?/\d{{2}}(?:0[1-9]|1[0-2])\d{{3}})(v\d+)?\b",
    re.IGNORECASE,
)
NUMBERED = re.compile(r"\[\s*([1-9]\d*)\s*(?:,\s*([1-9]\d*)\s*)?\]")
LISTED = re.compile(r"^[ \t]*\[(\d+)\]", re.MULTILINE)  # a numbered reference list's entry in the question
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)
MATH = re.compile(r"\$\$.*?\$\$|\$[^$\n]*\$|\\\(.*?\\\)|\\\[.*?\\\]", re.DOTALL)
PLACEHOLDER_HOSTS = re.compile(
    r"(?:localhost|127(?:\.\d+){3}|0\.0\.0\.0|\[::1\]|(?:.+\.)?example\.(?:com|org|net)"
    r"|.+\.(?:test|example|invalid|localhost))(?::\d+)?"
)
_TRAILING = ".,;:!?*_"
_CITES_AFTER = ".,;:)!?。，；：）！？、"  # and their full-width forms


@dataclass
class CitationConfig:
    allowlist: str | None = None  # a text file, one URL / DOI / arXiv id per line (offline); `#` starts a comment
    unknown_is_fabricated: bool = True  # a citation in neither the prompt's sources nor the allowlist


@dataclass
class PenaltyConfig:
    language_weight: float = 0.5
    code_switching_weight: float = 0.5
    overconfidence_weight: float = 0.2
    citation: CitationConfig = field(default_factory=CitationConfig)
    fabricated_score: float = 0.0  # the reward of an answer with a fabricated citation
    clip: tuple[float, float] = (0.0, 1.0)


@dataclass
class PenaltyReport:
    # language (0/1 script mismatch), code_switching (ratio 0..1), overconfidence (0..1), citations (count),
    # fabricated_citations (count)
    components: dict[str, float]
    fabricated: list[str]  # the fabricated citations, as written


@dataclass(frozen=True)
class Citation:
    kind: str  # "url", "doi", "arxiv" or "ref"
    text: str  # as written
    key: str  # normalised: "url:host/path?query", "doi:10.x/y", "arxiv:2401.01234", "ref:3"
    start: int  # offset in the text it was read from


# ---- language


@lru_cache(maxsize=8192)
def script_of(char: str) -> str | None:
    """The script of a letter (a value of SCRIPTS), or None for a non-letter or a letter of no listed script."""
    if not unicodedata.category(char).startswith("L"):
        return None
    words = unicodedata.name(char, "").split()
    if words and words[0] in ("FULLWIDTH", "HALFWIDTH"):
        words = words[1:]
    return SCRIPTS.get(words[0]) if words else None


def script_counts(text: str) -> Counter[str]:
    """Letters per script in `text`'s prose (see `prose`), Han and kana merged as "Japanese" where kana occurs."""
    counts = Counter(script for script in map(script_of, prose(text)) if script)
    if "Kana" in counts:
        counts["Japanese"] = counts.pop("Kana") + counts.pop("Han", 0)
    return counts


def language_scores(question: str, answer: str) -> tuple[float, float]:
    """(language, code_switching): 1.0 when the answer's dominant script differs from the question's, else 0.0;
    the share of the answer's letters outside its dominant script. (0.0, 0.0) for an answer without letters."""
    answer_counts = script_counts(answer)
    if not answer_counts:
        return 0.0, 0.0
    script, count = answer_counts.most_common(1)[0]
    question_counts = script_counts(question)
    mismatch = bool(question_counts) and question_counts.most_common(1)[0][0] != script
    return float(mismatch), 1.0 - count / sum(answer_counts.values())


# ---- what is not prose


def _blank(pattern: re.Pattern[str], text: str) -> str:
    """`text` with every match of `pattern` replaced by as many spaces, so offsets keep their meaning."""
    return pattern.sub(lambda match: " " * len(match.group()), text)


def prose(text: str) -> str:
    """`text` with code, LaTeX math, URLs, DOIs and arXiv ids blanked out (offsets unchanged)."""
    for pattern in (CODE, MATH, URL, DOI, ARXIV_NEW, ARXIV_OLD):
        text = _blank(pattern, text)
    return text


# ---- citations


def _strip_trailing(text: str) -> str:
    """`text` without trailing punctuation or a closing bracket that it never opened."""
    while text:
        last = text[-1]
        if last in _TRAILING or (last == ")" and text.count("(") < text.count(")")):
            text = text[:-1]
        elif last == "]" and text.count("[") < text.count("]"):
            text = text[:-1]
        else:
            break
    return text


def _doi_key(doi: str) -> str:
    """The normalised key of a DOI; an arXiv DOI (10.48550/arXiv.ID) is its arXiv id."""
    doi = doi.lower()
    if doi.startswith("10.48550/arxiv."):
        return _arxiv_key(doi.removeprefix("10.48550/arxiv."))
    return f"doi:{doi}"


def _arxiv_key(identifier: str) -> str:
    """The normalised key of an arXiv id: lower case, no version, no old-style subject class."""
    identifier = re.sub(r"v\d+$", "", identifier.lower())
    archive, slash, number = identifier.partition("/")
    return f"arxiv:{archive.split('.')[0]}/{number}" if slash else f"arxiv:{identifier}"


def _url_key(url: str) -> str | None:
    """The normalised key of a URL (a doi.org URL is its DOI, an arxiv.org one its id); None for a placeholder."""
    parts = urlsplit(url)
    host = parts.netloc.lower().rpartition("@")[2].removeprefix("www.")
    if PLACEHOLDER_HOSTS.fullmatch(host):
        return None
    path = unquote(parts.path).rstrip("/")
    if host in ("doi.org", "dx.doi.org") and path.startswith("/10."):
        return _doi_key(path[1:])
    arxiv = re.fullmatch(r"/(?:abs|pdf)/(.+?)(?:\.pdf)?", path)
    if host in ("arxiv.org", "export.arxiv.org") and arxiv:
        return _arxiv_key(arxiv.group(1))
    return f"url:{host}{path}" + (f"?{parts.query}" if parts.query else "")


def _valid_new_arxiv(match: re.Match[str]) -> bool:
    """A new-style id names a month from April 2007 with four digits after the dot until 2014, five after."""
    year, month, number = int(match.group(2)), int(match.group(3)), match.group(4)
    return 1 <= month <= 12 and (year, month) >= (7, 4) and len(number) == (4 if year <= 14 else 5)


def links(text: str) -> list[Citation]:
    """The URLs, DOIs and arXiv ids of `text`, in order. A URL's span is read only as the URL, and a DOI's only as
    the DOI, so nothing is counted twice."""
    found = []
    for match in URL.finditer(text):
        written = _strip_trailing(match.group())
        key = _url_key(written)
        if key:
            found.append(Citation(key.partition(":")[0], written, key, match.start()))
    text = _blank(URL, text)
    for match in DOI.finditer(text):
        written = _strip_trailing(match.group())
        key = _doi_key(written[match.start(1) - match.start() :])
        found.append(Citation(key.partition(":")[0], written, key, match.start()))
    text = _blank(DOI, text)
    for match in ARXIV_NEW.finditer(text):
        if _valid_new_arxiv(match):
            found.append(Citation("arxiv", match.group(), _arxiv_key(match.group(1)), match.start()))
    for match in ARXIV_OLD.finditer(text):
        found.append(Citation("arxiv", match.group(), _arxiv_key(match.group(1)), match.start()))
    return sorted(found, key=lambda citation: citation.start)


def _follows_a_word(before: str) -> bool:
    """Whether a bracket after `before` (the text of its line before it) stands where a citation is written."""
    stripped = before.rstrip()
    if not stripped:
        return True  # the start of a line: an entry of a reference list
    last = stripped[-1]
    if last in _CITES_AFTER:
        return True
    spaced = len(stripped) < len(before)
    return last.isalpha() and (spaced or not last.isascii())


def numbered_references(text: str) -> list[Citation]:
    """The numbered references `[n]` / `[n, m]` that `text` cites, one per number (the rule is in the module doc)."""
    text = prose(text)
    found = []
    for match in NUMBERED.finditer(text):
        numbers = [int(group) for group in match.groups() if group is not None]
        line_start = text.rfind("\n", 0, match.start()) + 1
        if (
            max(numbers) > MAX_REFERENCE
            or numbers != sorted(set(numbers))
            or text[match.end() : match.end() + 1] == "("
            or not _follows_a_word(text[line_start : match.start()])
        ):
            continue
        found.extend(Citation("ref", f"[{number}]", f"ref:{number}", match.start()) for number in numbers)
    return found


def citations(text: str) -> list[Citation]:
    """Everything `text` cites, each normalised key once, in the order first written."""
    seen, unique = set(), []
    for citation in sorted(links(text) + numbered_references(text), key=lambda citation: citation.start):
        if citation.key not in seen:
            seen.add(citation.key)
            unique.append(citation)
    return unique


def load_allowlist(path: str) -> frozenset[str]:
    """The normalised keys of an allowlist file: one URL, DOI or arXiv id per line; blank lines and `#` comments
    (a whole line, or after whitespace) are skipped."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"citation.allowlist: no such file {path}")
    keys = set()
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        entry = re.sub(r"(?:^|\s)#.*", "", line).strip()
        if not entry:
            continue
        found = links(entry)
        if len(found) != 1:
            raise ValueError(f"citation.allowlist {path}:{number}: {entry!r} is not one URL, DOI or arXiv id")
        keys.add(found[0].key)
    return frozenset(keys)


# ---- over-confidence


def overconfidence(answer: str) -> float:
    """min(1, max(0, certainty markers - hedges) / 2) over the answer's prose."""
    text = prose(answer)
    excess = len(CERTAINTY.findall(text)) - len(HEDGING.findall(text))
    return min(1.0, max(0, excess) / 2)


class Penalties:
    """Scores an answer's behaviour against its question and combines the penalties with a preference."""

    def __init__(self, config: PenaltyConfig):
        lo, hi = config.clip
        if lo > hi:
            raise ValueError(f"clip: the low end {lo} is above the high end {hi}")
        self.config = config
        self.allowlist = load_allowlist(config.citation.allowlist) if config.citation.allowlist else frozenset()

    def fabricated(self, question: str, cited: list[Citation]) -> list[Citation]:
        """The citations of `cited` that neither the question (the whole prompt text) nor the allowlist holds."""
        sources = {citation.key for citation in links(question)}
        # A DOI or arXiv id inside one of the question's URLs (a publisher's page) is a source too.
        sources |= {_doi_key(_strip_trailing(match.group(1))) for match in DOI.finditer(question)}
        sources |= {_arxiv_key(match.group(1)) for match in ARXIV_NEW.finditer(question) if _valid_new_arxiv(match)}
        sources |= {_arxiv_key(match.group(1)) for match in ARXIV_OLD.finditer(question)}
        listed = {int(number) for number in LISTED.findall(prose(question))}
        unknown = self.config.citation.unknown_is_fabricated
        fabricated = []
        for citation in cited:
            if citation.kind == "ref":
                made_up = int(citation.key.partition(":")[2]) not in listed if listed else unknown
            else:
                made_up = unknown and citation.key not in sources and citation.key not in self.allowlist
            if made_up:
                fabricated.append(citation)
        return fabricated

    def assess(self, question: str, answer: str) -> PenaltyReport:
        """The penalties of `answer` (the final answer, after the reasoning) to `question` (all prompt text)."""
        language, switching = language_scores(question, answer)
        cited = citations(answer)
        fabricated = self.fabricated(question, cited)
        components = {
            "language": language,
            "code_switching": switching,
            "overconfidence": overconfidence(answer),
            "citations": float(len(cited)),
            "fabricated_citations": float(len(fabricated)),
        }
        return PenaltyReport(components, [citation.text for citation in fabricated])

    def combine(self, preference: float, report: PenaltyReport) -> float:
        """`fabricated_score` on any fabricated citation, else the preference less the weighted penalties, clipped."""
        if report.fabricated:
            return self.config.fabricated_score
        config, components = self.config, report.components
        score = (
            preference
            - config.language_weight * components["language"]
            - config.code_switching_weight * components["code_switching"]
            - config.overconfidence_weight * components["overconfidence"]
        )
        lo, hi = config.clip
        return min(hi, max(lo, score))
