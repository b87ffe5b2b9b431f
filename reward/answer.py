"""Answer-correctness reward: extract the model's final answer and compare it with the gold one.

Parsing is plain string work (regular expressions, ``int`` / ``float`` on validated digit strings);
nothing in a response is ever evaluated or executed.

Answer types (``meta["answer_type"]``, inferred when absent):

- ``choice``: multiple choice. The prediction may be a letter (``B``, ``(B)``, ``B)``, ``B.``, ``b``,
  ``Option B``, ``B) some text``) or the text of a choice; the gold may be a letter, an index, or a
  choice's text. Inferred when ``meta["choices"]`` is given.
- ``number``: ints, decimals, ``1e-3``, ``3/4``, ``-1 1/2`` (mixed), ``50%`` (= 50); thousands commas and
  ``$`` are ignored; compared with a relative / absolute tolerance (``meta["rel_tol"]``,
  ``meta["abs_tol"]``). Inferred when the gold answer parses as a number.
- ``text``: normalised exact match (lowercase, no punctuation, no articles, single spaces).

``meta["answer"]`` may also be a list of acceptable answers: any match scores 1.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from typing import Any

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_LINE = re.compile(
    r"^[ \t*#>_-]*(?:the\s+)?(?:final\s+)?answer\s*(?:is)?\s*[:：]\s*(.+?)\s*$",
    re.IGNORECASE | re.MULTILINE,
)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT_TABLE = str.maketrans({c: " " for c in string.punctuation})
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_NUMBER_FULL = re.compile(rf"^{_NUMBER}$")
_FRACTION_FULL = re.compile(r"^([+-]?)(\d+)\s*/\s*(\d+)$")
_MIXED_FULL = re.compile(r"^([+-]?)(\d+)\s+(\d+)\s*/\s*(\d+)$")
_NUMBER_TOKEN = re.compile(rf"[+-]?\d+\s*/\s*\d+|{_NUMBER}")
_WRAP = re.compile(r"^[\s(\[{*`'\".:]+|[\s)\]}*`'\".:]+$")
_MAX_NUMBER_CHARS = 64  # longer digit strings are rejected rather than parsed

DEFAULT_REL_TOL = 1e-4
DEFAULT_ABS_TOL = 1e-6


# ---------------------------------------------------------------------------------------------- extract
def extract_answer(text: str) -> str | None:
    """The content of the last ``<answer>...</answer>``; else the last ``Answer: X`` line; else None."""
    if not isinstance(text, str) or not text:
        return None
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    lines = _ANSWER_LINE.findall(text)
    if lines:
        return lines[-1].strip()
    return None


# ---------------------------------------------------------------------------------------------- text
def normalize_text(s: str) -> str:
    """Lowercase, punctuation to spaces, drop articles (a / an / the), collapse whitespace."""
    s = s.lower().translate(_PUNCT_TABLE)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


# ---------------------------------------------------------------------------------------------- numbers
def parse_number(s: str) -> float | None:
    """Parse a whole string as a number (int, decimal, exponent, fraction, mixed number, percent).

    Returns None when the string is not exactly one number. No ``eval``: the digits are validated by a
    regular expression and converted with ``float`` / ``int``.
    """
    if not isinstance(s, str):
        return None
    t = s.strip().strip(".").strip()
    t = t.replace("$", "").replace("\u2212", "-").replace("\u00a0", " ")
    if t.endswith("%"):
        t = t[:-1].strip()
    t = re.sub(r"(?<=\d),(?=\d{3}\b)", "", t)  # thousands separators
    if not t or len(t) > _MAX_NUMBER_CHARS:
        return None
    if _NUMBER_FULL.match(t):
        try:
            v = float(t)
        except (ValueError, OverflowError):
            return None
        return v if math.isfinite(v) else None
    m = _MIXED_FULL.match(t)
    if m:
        sign, whole, num, den = m.groups()
        if int(den) == 0:
            return None
        v = int(whole) + int(num) / int(den)
        return -v if sign == "-" else v
    m = _FRACTION_FULL.match(t)
    if m:
        sign, num, den = m.groups()
        if int(den) == 0:
            return None
        v = int(num) / int(den)
        return -v if sign == "-" else v
    return None


def find_number(s: str) -> float | None:
    """``parse_number`` of the whole string, else of the last number-looking token in it."""
    v = parse_number(s)
    if v is not None:
        return v
    cleaned = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    tokens = _NUMBER_TOKEN.findall(cleaned)
    for tok in reversed(tokens):
        v = parse_number(tok)
        if v is not None:
            return v
    return None


def numbers_match(pred: float, gold: float, rel_tol: float = DEFAULT_REL_TOL, abs_tol: float = DEFAULT_ABS_TOL) -> bool:
    return math.isclose(pred, gold, rel_tol=rel_tol, abs_tol=abs_tol)


# ---------------------------------------------------------------------------------------------- choices
def _letters(n_choices: int | None) -> str:
    n = max(4, n_choices or 0)
    return string.ascii_uppercase[: min(n, 26)]


def parse_choice(pred: str, choices: Sequence[str] | None = None) -> str | None:
    """Map a predicted answer to a choice letter (``"A"``...), or None.

    Accepted: ``B``, ``b``, ``(B)``, ``B)``, ``B.``, ``B:``, ``[B]``, ``Option B``, ``B) text``, and the
    text of a choice (normalised match). Letters beyond the number of choices (at least A-D) are rejected.
    """
    if not isinstance(pred, str):
        return None
    valid = _letters(len(choices) if choices else None)
    p = pred.strip()
    if not p:
        return None
    # a lone letter, possibly wrapped: "B", "(b)", "B)", "B.", "[B]", "**B**"
    bare = _WRAP.sub("", p)
    if len(bare) == 1 and bare.upper() in valid:
        return bare.upper()
    # "Option B" / "choice (B)" / "answer: B"
    m = re.match(r"^(?:option|choice|answer)\s*[:\-]?\s*[(\[]?([A-Za-z])[)\]]?(?:[\s.:,)]|$)", p, re.IGNORECASE)
    if m and m.group(1).upper() in valid:
        return m.group(1).upper()
    # choice text (checked before "letter + text" so that "a dog" is not read as letter A)
    if choices:
        norm = normalize_text(p)
        for i, c in enumerate(choices[: len(valid)]):
            if norm and norm == normalize_text(str(c)):
                return valid[i]
    # "(B) text", "B) text", "B. text", "B: text" (explicit delimiter required)
    m = re.match(r"^[(\[]([A-Za-z])[)\]]", p) or re.match(r"^([A-Za-z])[).:]\s", p)
    if m and m.group(1).upper() in valid:
        return m.group(1).upper()
    return None


def _gold_choice(gold: Any, choices: Sequence[str] | None) -> str | None:
    valid = _letters(len(choices) if choices else None)
    if isinstance(gold, bool):
        return None
    if isinstance(gold, int):
        return valid[gold] if 0 <= gold < len(valid) else None
    return parse_choice(str(gold), choices)


# ---------------------------------------------------------------------------------------------- reward
def _is_number_like(g: Any) -> bool:
    if isinstance(g, bool):
        return False
    if isinstance(g, (int, float)):
        return True
    return isinstance(g, str) and parse_number(g) is not None


def infer_answer_type(meta: dict) -> str:
    t = meta.get("answer_type")
    if t:
        t = str(t).lower()
        aliases = {"mc": "choice", "multiple_choice": "choice", "mcq": "choice", "numeric": "number",
                   "num": "number", "math": "number", "exact": "text", "str": "text", "string": "text"}
        t = aliases.get(t, t)
        if t not in ("choice", "number", "text"):
            raise ValueError(f"unknown answer_type {meta.get('answer_type')!r}; expected choice | number | text")
        return t
    if meta.get("choices"):
        return "choice"
    gold = meta.get("answer")
    golds = gold if isinstance(gold, (list, tuple)) else [gold]
    if golds and all(_is_number_like(g) for g in golds):
        return "number"
    return "text"


def is_correct(pred: str, meta: dict) -> bool:
    """Whether an extracted answer string matches ``meta["answer"]`` under the answer type."""
    if "answer" not in meta or meta["answer"] is None:
        raise KeyError("meta has no 'answer'")
    kind = infer_answer_type(meta)
    gold = meta["answer"]
    golds = list(gold) if isinstance(gold, (list, tuple)) else [gold]
    choices = meta.get("choices") or None
    if kind == "choice":
        letter = parse_choice(pred, choices)
        if letter is None:
            return False
        return any(_gold_choice(g, choices) == letter for g in golds)
    if kind == "number":
        p = find_number(pred)
        if p is None:
            return False
        rel = float(meta.get("rel_tol", DEFAULT_REL_TOL))
        ab = float(meta.get("abs_tol", DEFAULT_ABS_TOL))
        for g in golds:
            gv = float(g) if isinstance(g, (int, float)) and not isinstance(g, bool) else parse_number(str(g))
            if gv is not None and numbers_match(p, gv, rel, ab):
                return True
        return False
    norm = normalize_text(pred)
    return bool(norm) and any(norm == normalize_text(str(g)) for g in golds)


def answer_reward(response_text: str, meta: dict) -> float:
    """1.0 if the response's final answer is correct, 0.0 if wrong or missing."""
    pred = extract_answer(response_text)
    if pred is None:
        return 0.0
    return 1.0 if is_correct(pred, meta) else 0.0
