"""Format reward: the response ends with exactly one well-formed ``<answer>...</answer>``."""

from __future__ import annotations

import re

# End-of-sequence strings a decoder may leave at the end of a response; they do not count as trailing text.
EOS_STRINGS: tuple[str, ...] = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "</s>", "<eos>", "<|end|>")

_OPEN = re.compile(r"<answer>", re.IGNORECASE)
_CLOSE = re.compile(r"</answer>", re.IGNORECASE)


def _strip_trailing_eos(text: str, eos: tuple[str, ...]) -> str:
    t = text.rstrip()
    changed = True
    while changed:
        changed = False
        for e in eos:
            if e and t.endswith(e):
                t = t[: -len(e)].rstrip()
                changed = True
    return t


def is_well_formed(response_text: str, eos_strings: tuple[str, ...] = EOS_STRINGS) -> bool:
    """Exactly one ``<answer>`` and one ``</answer>``, in that order, non-empty content, nothing after."""
    if not isinstance(response_text, str):
        return False
    t = _strip_trailing_eos(response_text, eos_strings)
    opens = [m.start() for m in _OPEN.finditer(t)]
    closes = [m.start() for m in _CLOSE.finditer(t)]
    if len(opens) != 1 or len(closes) != 1:
        return False
    o, c = opens[0], closes[0]
    if c < o:
        return False
    if not t[o + len("<answer>") : c].strip():
        return False
    return c + len("</answer>") == len(t)


def format_reward(response_text: str, meta: dict | None = None) -> float:
    """1.0 if the response ends with exactly one well-formed ``<answer>..</answer>``, else 0.0.

    ``meta`` is accepted for a uniform reward signature; ``meta["eos_strings"]`` overrides the list of
    end-of-sequence strings ignored at the end.
    """
    eos = tuple((meta or {}).get("eos_strings", EOS_STRINGS))
    return 1.0 if is_well_formed(response_text, eos) else 0.0
