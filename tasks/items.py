"""The prompt item every task yields, and the text prompt built from it."""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import numpy as np

ANSWER_START = "<answer>"
ANSWER_END = "</answer>"
LETTERS = string.ascii_uppercase


@dataclass
class PromptItem:
    """One prompt: an optional RGB image (H, W, 3) uint8, a question, optional choices and the answer.

    For a multiple-choice item ``answer`` is the letter of the correct choice ("A", "B", ...).
    ``meta`` carries task-specific extras (clean image, degradation, severity, source line, ...).
    """

    prompt_id: str
    image: np.ndarray | None
    question: str
    choices: list[str] | None
    answer: str
    meta: dict = field(default_factory=dict)

    @property
    def answer_text(self) -> str:
        """The answer as text: the chosen option for a multiple-choice item, else ``answer``."""
        if self.choices:
            i = LETTERS.find(self.answer)
            if len(self.answer) == 1 and 0 <= i < len(self.choices):
                return self.choices[i]
        return self.answer


def choice_letters(n: int) -> list[str]:
    """The first ``n`` option letters: A, B, C, ..."""
    if not 0 <= n <= len(LETTERS):
        raise ValueError(f"between 0 and {len(LETTERS)} choices are supported, got {n}")
    return list(LETTERS[:n])


def format_choices(choices: list[str]) -> str:
    """``["red", "green"]`` -> ``"A) red B) green"``."""
    return " ".join(f"{letter}) {c}" for letter, c in zip(choice_letters(len(choices)), choices))


def format_prompt(item: PromptItem) -> str:
    """The question text the policy sees, with lettered choices and the answer-format instruction."""
    lines = [item.question.strip()]
    if item.choices:
        lines.append(format_choices(item.choices))
        last = choice_letters(len(item.choices))[-1]
        lines.append(
            f"Answer with the letter of the correct choice (A-{last}) as {ANSWER_START}X{ANSWER_END}."
        )
    else:
        lines.append(f"Give the final answer as {ANSWER_START}...{ANSWER_END}.")
    return "\n".join(lines)
