"""Config text handling shared by every config model: ``a.b=c`` overrides checked against a schema,
and one-line errors that name the field path (``ConfigError``, ``format_validation_error``)."""

from __future__ import annotations

import json
import types
import typing
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ValidationError

from policy.config import FieldError

__all__ = ["ConfigError", "apply_overrides", "first_error", "format_validation_error"]


class ConfigError(ValueError):
    """A config problem tied to one field path (``rollout.group_size``)."""

    def __init__(self, field_path: str, message: str) -> None:
        self.field_path = field_path
        self.message = message
        super().__init__(f"{field_path}: {message}" if field_path else message)


# ---------------------------------------------------------------------------------------- overrides
def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _unwrap_optional(args[0])
    if origin is Annotated:
        return _unwrap_optional(typing.get_args(tp)[0])
    return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _check_schema_path(keys: list[str], schema: type[BaseModel]) -> None:
    """Raise ConfigError unless ``keys`` names a field (or inside a free-form dict / list) of schema."""
    tp: Any = schema
    for i, key in enumerate(keys):
        here = ".".join(keys[: i + 1])
        tp = _unwrap_optional(tp)
        origin = typing.get_origin(tp)
        if _is_model(tp):
            fields = tp.model_fields
            if key not in fields:
                extra = tp.model_config.get("extra")
                if extra == "forbid":
                    known = ", ".join(fields)
                    raise ConfigError(here, f"unknown config key (known here: {known})")
                return
            tp = fields[key].annotation
        elif origin in (dict, typing.Mapping) or tp is dict:
            return  # free-form mapping: any sub-key
        elif origin in (list, tuple) or tp in (list, tuple):
            if not key.lstrip("-").isdigit():
                raise ConfigError(here, f"expected a list index, got {key!r}")
            args = typing.get_args(tp)
            tp = args[0] if args else Any
        else:
            parent = ".".join(keys[:i])
            raise ConfigError(here, f"{parent} is a plain value, it has no key {key!r}")


def _set_path(data: Any, keys: list[str], value: Any, full: str) -> None:
    node = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        here = ".".join(keys[: i + 1])
        if isinstance(node, list):
            idx = int(key)
            if not -len(node) <= idx < len(node):
                raise ConfigError(here, f"list index {idx} out of range (length {len(node)})")
            if last:
                node[idx] = value
            else:
                node = node[idx]
            continue
        if not isinstance(node, dict):
            raise ConfigError(here, f"cannot set a key inside a non-mapping value (in --set {full})")
        if last:
            node[key] = value
        else:
            nxt = node.get(key)
            if nxt is None:
                nxt = node[key] = {}
            node = nxt


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def apply_overrides(
    data: dict[str, Any], overrides: list[str], schema: type[BaseModel]
) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b.c=value`` applied.

    Values are parsed with ``yaml.safe_load`` (``3`` -> int, ``1e-4`` -> float, ``true`` -> bool,
    ``[1,2]`` -> list, ``null`` -> None). Keys are checked against ``schema`` (the run config's model);
    list elements are addressed by index (``reward.components.0.weight=2``).
    """
    out = json.loads(json.dumps(data, default=_json_default)) if data else {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(key or item, f"override must look like key.path=value, got {item!r}")
        keys = key.split(".")
        if any(not k for k in keys):
            raise ConfigError(key, "empty component in override key")
        _check_schema_path(keys, schema)
        _set_path(out, keys, _parse_value(raw), item)
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    return str(obj)


# ------------------------------------------------------------------------------------------- errors
def _loc_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc)


def first_error(e: ValidationError) -> tuple[str, str]:
    errors = e.errors(include_url=False)
    if not errors:
        return "", " ".join(str(e).split())
    err = errors[0]
    ctx_err = (err.get("ctx") or {}).get("error")
    loc = _loc_path(err.get("loc", ()))
    if isinstance(ctx_err, ConfigError):
        path, msg = ctx_err.field_path or loc, ctx_err.message
    elif isinstance(ctx_err, FieldError):  # a section's own validator: the path inside that section
        path, msg = ".".join(p for p in (loc, ctx_err.field_path) if p), ctx_err.message
    else:
        path, msg = loc, err.get("msg", "invalid value")
        if err.get("type") == "extra_forbidden":
            msg = "unknown config key (Extra inputs are not permitted)"
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
    if len(errors) > 1:
        msg += f" (+{len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return path, " ".join(msg.split())


def format_validation_error(e: BaseException) -> str:
    """One line: ``config error: rollout.group_size: Input should be greater than or equal to 2``."""
    if isinstance(e, ValidationError):
        path, msg = first_error(e)
    elif isinstance(e, ConfigError):
        path, msg = e.field_path, e.message
    else:
        path, msg = "", str(e)
    line = f"config error: {path}: {msg}" if path else f"config error: {msg}"
    return " ".join(line.split())
