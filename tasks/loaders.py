"""File-backed prompt sources: JSONL rows and VLMEvalKit-style TSV benchmarks.

Nothing is ever evaluated: JSON goes through ``json.loads``, TSV through ``csv``, images through Pillow.
Every row is validated when the file is loaded. A bad row raises ``RowError`` naming the file, the line
and the field (``on_bad_row="stop"``, the default) or is skipped and counted (``on_bad_row="skip"``:
``loader.skipped``, ``loader.errors``).

JSONL row::

    {"id": "q1", "image": "imgs/a.png", "question": "...", "choices": ["red", "blue"], "answer": "B"}

``image`` is a path relative to the JSONL file (absolute paths are allowed) or null / absent for a
text-only item; ``choices`` is optional; with choices, ``answer`` is a letter or the text of one choice
(stored as its letter). Other keys go to ``meta``.

TSV (VLMEvalKit): a header with ``index``, ``image`` (base64), ``question``, option columns ``A``, ``B``,
... (empty cells mean fewer options) and ``answer`` (a letter). As in VLMEvalKit, an ``image`` cell that
holds another row's ``index`` reuses that row's image. Other columns (``hint``, ``category``, ...) go to
``meta``.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import os
import string
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .items import PromptItem, choice_letters

_MISSING = object()


class RowError(ValueError):
    """A row of a prompt file that cannot be used; names the file, the line and the field."""

    def __init__(self, path: str | os.PathLike, line: int, field: str | None, message: str) -> None:
        self.path = os.fspath(path)
        self.line = int(line)
        self.field = field
        self.reason = message
        where = f"{self.path}:{self.line}"
        super().__init__(f"{where}: field {field!r}: {message}" if field else f"{where}: {message}")


def decode_image_bytes(data: bytes) -> np.ndarray:
    """Decode encoded image bytes with Pillow to (H, W, 3) uint8; raises ValueError when it cannot."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from e


def _check_mode(on_bad_row: str) -> str:
    if on_bad_row not in ("stop", "skip"):
        raise ValueError(f"on_bad_row must be 'stop' or 'skip', got {on_bad_row!r}")
    return on_bad_row


def _normalise_answer(answer: str, choices: list[str] | None, err) -> str:
    if not choices:
        return answer
    letters = choice_letters(len(choices))
    a = answer.strip()
    if len(a) == 1 and a.upper() in letters:
        return a.upper()
    if a in choices:
        if choices.count(a) > 1:
            raise err("answer", f"{answer!r} matches several choices; give the letter")
        return letters[choices.index(a)]
    raise err("answer", f"{answer!r} is neither a letter {letters[0]}-{letters[-1]} nor one of the choices")


class _RowDataset:
    """Shared list behaviour of the loaders."""

    def __init__(self, path: str | os.PathLike, on_bad_row: str) -> None:
        self.path = Path(path)
        self.on_bad_row = _check_mode(on_bad_row)
        self.items: list[PromptItem] = []
        self.errors: list[RowError] = []

    @property
    def skipped(self) -> int:
        """How many rows were skipped (``on_bad_row="skip"``)."""
        return len(self.errors)

    def _bad(self, error: RowError) -> None:
        if self.on_bad_row == "stop":
            raise error
        self.errors.append(error)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> PromptItem:
        return self.items[index]

    def __iter__(self):
        return iter(self.items)


class JsonlDataset(_RowDataset):
    """Prompt items from a JSONL file (one JSON object per line; blank lines ignored)."""

    def __init__(self, path: str | os.PathLike, on_bad_row: str = "stop") -> None:
        super().__init__(path, on_bad_row)
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {os.fspath(self.path)!r}: {e}") from e
        seen: set[str] = set()
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = self._parse(line, lineno)
                if item.prompt_id in seen:
                    raise RowError(self.path, lineno, "id", f"duplicate id {item.prompt_id!r}")
            except RowError as e:
                self._bad(e)
                continue
            seen.add(item.prompt_id)
            self.items.append(item)

    def _parse(self, line: str, lineno: int) -> PromptItem:
        def err(field: str | None, msg: str) -> RowError:
            return RowError(self.path, lineno, field, msg)

        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise err(None, f"invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise err(None, f"expected a JSON object, got {type(row).__name__}")

        question = row.get("question", _MISSING)
        if question is _MISSING:
            raise err("question", "missing")
        if not isinstance(question, str) or not question.strip():
            raise err("question", "must be a non-empty string")

        choices = row.get("choices")
        if choices is not None:
            if not isinstance(choices, list) or not 2 <= len(choices) <= len(string.ascii_uppercase):
                raise err("choices", "must be a list of 2 to 26 strings")
            if not all(isinstance(c, str) and c.strip() for c in choices):
                raise err("choices", "every choice must be a non-empty string")

        answer = row.get("answer", _MISSING)
        if answer is _MISSING:
            raise err("answer", "missing")
        if isinstance(answer, bool) or not isinstance(answer, (str, int)):
            raise err("answer", f"must be a string, got {type(answer).__name__}")
        answer = str(answer)
        if not answer.strip():
            raise err("answer", "must be non-empty")
        answer = _normalise_answer(answer, choices, err)

        pid = row.get("id", row.get("prompt_id", f"{self.path.stem}:{lineno}"))
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise err("id", "must be a string or an integer")

        image = None
        img_field = row.get("image")
        if img_field is not None:
            if not isinstance(img_field, str) or not img_field.strip():
                raise err("image", "must be a path string or null")
            img_path = Path(img_field)
            if not img_path.is_absolute():
                img_path = self.path.parent / img_path
            if not img_path.is_file():
                raise err("image", f"file {os.fspath(img_path)!r} not found")
            try:
                image = decode_image_bytes(img_path.read_bytes())
            except (OSError, ValueError) as e:
                raise err("image", f"file {os.fspath(img_path)!r}: {e}") from None

        known = {"id", "prompt_id", "image", "question", "choices", "answer"}
        meta: dict[str, Any] = {k: v for k, v in row.items() if k not in known}
        meta.update(source=os.fspath(self.path), line=lineno)
        if img_field is not None:
            meta["image_path"] = img_field
        return PromptItem(str(pid), image, question, list(choices) if choices else None, answer, meta)


class TsvDataset(_RowDataset):
    """Prompt items from a VLMEvalKit-style TSV (index, image as base64, question, A.., answer)."""

    REQUIRED = ("index", "image", "question", "answer")

    def __init__(self, path: str | os.PathLike, on_bad_row: str = "stop") -> None:
        super().__init__(path, on_bad_row)
        if csv.field_size_limit() < (1 << 30):
            csv.field_size_limit(min(sys.maxsize, (1 << 31) - 1))  # base64 images exceed the default 128 KiB
        try:
            fh = open(self.path, encoding="utf-8", newline="")
        except OSError as e:
            raise ValueError(f"cannot read {os.fspath(self.path)!r}: {e}") from e
        with fh:
            reader = csv.reader(fh, delimiter="\t")
            try:
                header = next(reader)
            except StopIteration:
                raise RowError(self.path, 1, None, "empty file: no header") from None
            except (csv.Error, UnicodeDecodeError) as e:
                raise RowError(self.path, 1, None, f"unreadable header: {e}") from None
            header = [h.strip() for h in header]
            missing = [c for c in self.REQUIRED if c not in header]
            if missing:
                raise RowError(self.path, 1, missing[0], f"header lacks required columns {missing}")
            self.option_columns = [c for c in string.ascii_uppercase if c in header]
            images_by_index: dict[str, np.ndarray] = {}
            seen: set[str] = set()
            while True:
                try:
                    cells = next(reader)
                except StopIteration:
                    break
                except (csv.Error, UnicodeDecodeError) as e:
                    self._bad(RowError(self.path, reader.line_num, None, f"malformed TSV: {e}"))
                    continue
                lineno = reader.line_num
                if not any(c.strip() for c in cells):
                    continue
                try:
                    item = self._parse(header, cells, lineno, images_by_index)
                    if item.prompt_id in seen:
                        raise RowError(self.path, lineno, "index", f"duplicate index {item.prompt_id!r}")
                except RowError as e:
                    self._bad(e)
                    continue
                seen.add(item.prompt_id)
                images_by_index[item.prompt_id] = item.image
                self.items.append(item)

    def _parse(self, header: list[str], cells: list[str], lineno: int, images: dict) -> PromptItem:
        def err(field: str | None, msg: str) -> RowError:
            return RowError(self.path, lineno, field, msg)

        if len(cells) != len(header):
            raise err(None, f"expected {len(header)} columns, got {len(cells)}")
        row = dict(zip(header, cells))
        index = row["index"].strip()
        if not index:
            raise err("index", "empty")
        question = row["question"]
        if not question.strip():
            raise err("question", "empty")

        choices: list[str] = []
        for c in self.option_columns:
            v = row[c].strip()
            if not v or v.lower() == "nan":
                break
            choices.append(v)
        for c in self.option_columns[len(choices) :]:
            v = row[c].strip()
            if v and v.lower() != "nan":
                raise err(c, "option follows an empty option")
        if self.option_columns and len(choices) < 2:
            raise err(
                self.option_columns[min(len(choices), len(self.option_columns) - 1)], "fewer than two options"
            )

        answer = row["answer"].strip()
        if not answer:
            raise err("answer", "empty")
        answer = _normalise_answer(answer, choices or None, err)

        cell = row["image"].strip()
        if not cell:
            raise err("image", "empty")
        if cell in images and len(cell) < 64:  # VLMEvalKit: a reference to another row's image
            image = images[cell]
        else:
            try:
                data = base64.b64decode(cell, validate=True)
            except (binascii.Error, ValueError) as e:
                raise err("image", f"invalid base64: {e}") from None
            try:
                image = decode_image_bytes(data)
            except ValueError as e:
                raise err("image", str(e)) from None

        skip = {"index", "image", "question", "answer", *self.option_columns}
        meta: dict[str, Any] = {k: v for k, v in row.items() if k not in skip}
        meta.update(source=os.fspath(self.path), line=lineno)
        return PromptItem(index, image, question, choices or None, answer, meta)
