"""What both HTTP apps share: a size-limited body reader, JSON errors (4xx on bad input, never 5xx) and
base64 PNG decoding / encoding.

A body is JSON (``Content-Type`` absent, ``application/json`` or ``*/*+json``; else 415), at most
``max_bytes`` (413), nested at most ``MAX_JSON_DEPTH`` levels and without NaN / Infinity (400). An image's
size is read from its PNG / JPEG header before anything is decoded: past ``max_pixels`` it is a 413.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import struct
from typing import Any

import numpy as np

MAX_IMAGE_PIXELS = 4096 * 4096
MAX_JSON_DEPTH = 32
_JSON_TYPE = re.compile(r"^\s*(application/json|[\w.+-]+/[\w.+-]+\+json)\s*(;.*)?$", re.IGNORECASE)
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_OPEN, _CLOSE = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


# ------------------------------------------------------------------------------------------ errors
class RequestError(Exception):
    """A bad request: ``status`` (400 / 413 / 422) and a JSON-able ``detail``."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(str(detail))
        self.status = status
        self.detail = detail


def error_response(e: RequestError):
    from fastapi.responses import Response

    body = json.dumps({"detail": e.detail}, ensure_ascii=True, default=str)  # lone surrogates stay escaped
    return Response(content=body, status_code=e.status, media_type="application/json")


def validation_detail(exc: Any) -> list[dict]:
    """A pydantic ValidationError as a JSON-safe list: location, message, type (no input echo)."""
    return [{"loc": [str(x) for x in err.get("loc", ())], "msg": str(err.get("msg", "")),
             "type": str(err.get("type", ""))} for err in exc.errors()]


def json_depth(raw: bytes) -> int:
    """How deeply ``raw`` nests arrays / objects (brackets inside strings do not count)."""
    outside = np.frombuffer(_JSON_STRING.sub(b'""', raw), np.uint8)
    steps = np.isin(outside, _OPEN).astype(np.int32) - np.isin(outside, _CLOSE).astype(np.int32)
    return int(np.cumsum(steps).max()) if steps.size else 0


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> Any:
    """Strict JSON (UTF-8, no NaN / Infinity), nested at most ``MAX_JSON_DEPTH`` levels; 400 otherwise."""
    if not raw.strip():
        raise RequestError(400, "empty body: expected a JSON object")
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise RequestError(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)  # RFC 8259: UTF-8 only
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise RequestError(400, f"body is not valid JSON: {e}") from None


async def read_json(request: Any, max_bytes: int) -> Any:
    """The request body parsed as JSON: 415 for a non-JSON Content-Type, 413 past ``max_bytes``
    (Content-Length or streamed), 400 when the body is not (strict, bounded) JSON."""
    ctype = request.headers.get("content-type")
    if ctype is not None and not _JSON_TYPE.match(ctype):
        raise RequestError(415, f"Content-Type must be application/json, got {ctype[:100]!r}")
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise RequestError(400, "invalid Content-Length header") from None
        if declared > max_bytes:
            raise RequestError(413, f"request body of {declared} bytes exceeds the limit of {max_bytes} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise RequestError(413, f"request body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return parse_json(b"".join(chunks))


def parse_model(model: type, data: Any) -> Any:
    """``model.model_validate(data)`` or 422 naming the bad fields."""
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestError(422, validation_detail(e)) from None


def json_float(x: float) -> float | None:
    """NaN / inf -> None (JSON has no NaN)."""
    x = float(x)
    return x if np.isfinite(x) else None


# ------------------------------------------------------------------------------------------ images
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def image_header_size(raw: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG IHDR or a JPEG SOF header, without decoding; None when neither is found."""
    if raw.startswith(_PNG_MAGIC) and len(raw) >= 24 and raw[12:16] == b"IHDR":
        return struct.unpack(">II", raw[16:24])
    if raw.startswith(b"\xff\xd8"):
        i = 2
        while i + 4 <= len(raw):
            if raw[i] != 0xFF:
                return None
            marker = raw[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
                i += 2
                continue
            (seg_len,) = struct.unpack(">H", raw[i + 2 : i + 4])
            if marker in _JPEG_SOF and i + 9 <= len(raw):
                h, w = struct.unpack(">HH", raw[i + 5 : i + 9])
                return w, h
            if seg_len < 2:
                return None
            i += 2 + seg_len
    return None


def decode_image(b64: str, field: str, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Base64 PNG (or JPEG; a ``data:image/...;base64,`` prefix is allowed) -> uint8 (H, W, 3).
    Over ``max_pixels`` (read from the header, before decoding) is a 413; anything else not a decodable
    PNG / JPEG a 400; both name ``field``."""
    from PIL import Image

    text = b64.split(",", 1)[1] if b64.startswith("data:") and "," in b64 else b64
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"{field}: not valid base64 ({e})") from None
    size = image_header_size(raw)
    if size is None:
        raise RequestError(400, f"{field}: not a PNG or JPEG image (no readable header)")
    w, h = size
    if w < 1 or h < 1:
        raise RequestError(400, f"{field}: image of {w}x{h} pixels is empty")
    if w * h > max_pixels:
        raise RequestError(413, f"{field}: image of {w}x{h} pixels exceeds the limit of {max_pixels} pixels")
    try:
        with Image.open(io.BytesIO(raw), formats=("PNG", "JPEG")) as img:
            if img.size != (w, h):
                raise RequestError(400, f"{field}: inconsistent image header")
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except RequestError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure on client bytes is the client's 400
        raise RequestError(400, f"{field}: not a decodable PNG image ({type(e).__name__}: {e})") from None
    if arr.ndim != 3 or arr.shape[:2] != (h, w):
        raise RequestError(400, f"{field}: decoded to an unexpected shape {arr.shape}")
    return arr.copy()


def encode_png(pixels: np.ndarray) -> str:
    """uint8 (H, W, 3) or float (3, H, W) in [0, 1] -> base64 PNG."""
    from PIL import Image

    a = np.asarray(pixels)
    if a.dtype != np.uint8:
        if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
            a = np.moveaxis(a, 0, -1)
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
