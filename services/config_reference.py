"""The configuration reference, rendered from the schema: one markdown table per section of ``RunConfig``.

Each row is a field: its dotted path, type (with its bounds), default and description. The description is
the field's ``Field(description=...)`` when it has one, else its entry in :data:`FIELD_DOCS` (``services/config_docs.py``), else
the comment beside the field (or the comment lines right above it) in its source file
(``services/config.py``, ``policy/config.py``). Sections are found by
walking ``RunConfig``: a field whose type is a config model is a section, a list of config models is a
section of its items (``reward.components[]``).

    python -m services.config_reference                 # print the reference (markdown)
    python -m services.config_reference --write README.md   # replace the README's marked block with it

The README holds the output between :data:`START` and :data:`END`; ``tests/test_docs.py`` fails when it
differs from what :func:`render_reference` gives for the schema as it is.
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import io
import json
import sys
import tokenize
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from services.config import RunConfig
from services.config_docs import FIELD_DOCS, SECTION_DOCS

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"


@dataclass(frozen=True)
class Row:
    path: str
    type: str
    default: str
    description: str


@dataclass(frozen=True)
class Section:
    path: str  # "" for the top level
    model: type[BaseModel]
    rows: tuple[Row, ...]


# ------------------------------------------------------------------------------------------- walking
def _model_of(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(config model, is_list) when ``annotation`` is a model or a list of models, else (None, False)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation) or (None,)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item, True
    return None, False


def iter_sections(model: type[BaseModel] = RunConfig, path: str = "") -> Iterator[Section]:
    """Every section under ``model`` (itself first, then its sub-sections depth-first, in field order)."""
    rows, subs = [], []
    for name, field in model.model_fields.items():
        sub, is_list = _model_of(field.annotation)
        fpath = f"{path}.{name}" if path else name
        if sub is not None and not is_list:
            subs.append((sub, fpath))
            continue
        rows.append(Row(fpath, format_type(field.annotation, field.metadata), format_default(field),
                        describe(model, name, fpath)))
        if sub is not None:
            subs.append((sub, f"{fpath}[]"))
    yield Section(path, model, tuple(rows))
    for sub, spath in subs:
        yield from iter_sections(sub, spath)


def field_paths(model: type[BaseModel] = RunConfig) -> list[str]:
    """The dotted path of every leaf field (the rows of the reference)."""
    return [row.path for section in iter_sections(model) for row in section.rows]


# ------------------------------------------------------------------------------------- descriptions
@functools.cache
def _source_comments(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> the comment on the line(s) that define it in the class body (else the comment lines
    right above it), for ``model`` and its bases."""
    out: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or cls is BaseModel:
            continue
        try:
            source = Path(inspect.getsourcefile(cls) or "").read_text(encoding="utf-8")
        except (OSError, TypeError):
            continue
        source_lines = source.splitlines()
        comments: dict[int, str] = {}
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
        for node in ast.walk(ast.parse(source)):
            if not (isinstance(node, ast.ClassDef) and node.name == cls.__name__):
                continue
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    lines = list(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
                    if not any(i in comments for i in lines):  # else the comment lines right above it
                        above = stmt.lineno - 1
                        while above in comments and source_lines[above - 1].lstrip().startswith("#"):
                            above -= 1
                        lines = list(range(above + 1, stmt.lineno))
                    text = " ".join(comments[i] for i in lines if i in comments)
                    if text and not text.startswith(("noqa", "type:", "fmt:")):
                        out[stmt.target.id] = text
    return out


def describe(model: type[BaseModel], name: str, path: str) -> str:
    """The field's ``Field`` description, else its FIELD_DOCS entry, else the comment beside it in the source."""
    field = model.model_fields[name]
    text = field.description or FIELD_DOCS.get(path) or _source_comments(model).get(name, "")
    return _sentence(text)


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    if text and text[0].islower():
        text = text[0].upper() + text[1:]
    if text and not text.endswith("."):
        text += "."
    return text


# ------------------------------------------------------------------------------------- type / default
def _bounds(metadata: list[Any]) -> str:
    lo = hi = None
    for m in metadata:
        for attr, side in (("gt", "("), ("ge", "["), ("lt", ")"), ("le", "]")):
            value = getattr(m, attr, None)
            if value is not None:
                if side in "([":
                    lo = (side, value)
                else:
                    hi = (side, value)
    if lo and hi:
        return f" in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo:
        return f" {'>' if lo[0] == '(' else '>='} {lo[1]}"
    if hi:
        return f" {'<' if hi[0] == ')' else '<='} {hi[1]}"
    if any(getattr(m, "min_length", None) == 1 for m in metadata):
        return " (non-empty)"
    return ""


def format_type(annotation: Any, metadata: list[Any] | None = None) -> str:
    """A short, readable type: ``int > 0``, ``float in [0, 1]``, ``"hf" | "vllm"``, ``str | null``."""
    metadata = list(metadata or [])
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        inner = [m for a in args[1:] for m in (a.metadata if isinstance(a, FieldInfo) else [a])]
        return format_type(args[0], inner + metadata)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(format_type(a) for a in args) + _bounds(metadata)
    if origin in (list, tuple, dict):
        inner = ", ".join(format_type(a) for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]"
    if isinstance(annotation, type):
        return annotation.__name__ + _bounds(metadata)
    return str(annotation).replace("typing.", "")


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def format_default(field: FieldInfo) -> str:
    """The default as it would be written in YAML (JSON flow style for lists and mappings)."""
    if field.is_required():
        return "(required)"
    value = _plain(field.get_default(call_default_factory=True))
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (list, dict)):
        return f"`{json.dumps(value, separators=(', ', ': '))}`"
    return f"`{value}`"


# ------------------------------------------------------------------------------------------- render
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_section(section: Section) -> str:
    title = f"`{section.path}`" if section.path else "top level"
    doc = SECTION_DOCS.get(section.path) or (inspect.getdoc(section.model) or "").split("\n")[0]
    lines = [f"### {title}", ""]
    if doc:
        lines += [_sentence(doc), ""]
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    for row in section.rows:
        lines.append(f"| `{row.path}` | `{_cell(row.type)}` | {_cell(row.default)} | {_cell(row.description)} |")
    return "\n".join(lines)


def render_reference(model: type[BaseModel] = RunConfig) -> str:
    """The whole reference: one table per section, in the schema's order."""
    head = ("Generated from the schema (`services/config.py`) by `python -m services.config_reference`; "
            "do not edit by hand. Every model forbids unknown keys: a typo is an error naming its field path.")
    return "\n\n".join([head, *(render_section(s) for s in iter_sections(model) if s.rows)]) + "\n"


def readme_block(text: str) -> str:
    """What a document holds between START and END (ValueError when the markers are missing)."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"markers {START} ... {END} not found")
    return text[start + len(START):end].strip("\n") + "\n"


def write_readme(path: str | Path) -> bool:
    """Replace the block between the markers of ``path`` with the reference; True when it changed."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    readme_block(text)  # the markers must be there
    start, end = text.find(START) + len(START), text.find(END)
    new = text[:start] + "\n" + render_reference() + text[end:]
    if new != text:
        p.write_text(new, encoding="utf-8")
    return new != text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", metavar="README", help="replace the marked block of this file instead of printing")
    args = p.parse_args(argv)
    if args.write:
        changed = write_readme(args.write)
        print(f"{args.write}: {'updated' if changed else 'already up to date'}")
        return 0
    sys.stdout.write(render_reference())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
