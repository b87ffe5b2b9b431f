"""What both HTTP apps share: a size-limited body reader, JSON errors (4xx on bad input, never 5xx) and
base64 PNG decoding / encoding."""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any

import numpy as np

MAX_IMAGE_PIXELS = 4096 * 4096


# ------------------------------------------------------------------------------------------ errors
class RequestError(Exception):
    """A bad request: ``status`` (400 / 413 / 422) and a JSON-able ``detail``."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(str(detail))
        self.status = status
        self.detail = detail


def error_response(e: RequestError):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=e.status, content={"detail": e.detail})


def validation_detail(exc: Any) -> list[dict]:
    """A pydantic ValidationError as a JSON-safe list: location, message, type (no input echo)."""
    return [{"loc": [str(x) for x in err.get("loc", ())], "msg": str(err.get("msg", "")),
             "type": str(err.get("type", ""))} for err in exc.errors()]


async def read_json(request: Any, max_bytes: int) -> Any:
    """The request body parsed as JSON: 413 past ``max_bytes`` (Content-Length or streamed), 400 when the
    body is not JSON."""
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
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"body is not valid JSON: {e}") from None


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
def decode_image(b64: str, field: str, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Base64 PNG (or JPEG; a ``data:image/...;base64,`` prefix is allowed) -> uint8 (H, W, 3).
    Anything else is a 400 naming ``field``."""
    from PIL import Image, UnidentifiedImageError

    text = b64.split(",", 1)[1] if b64.startswith("data:") and "," in b64 else b64
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"{field}: not valid base64 ({e})") from None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.format not in ("PNG", "JPEG"):
                raise RequestError(400, f"{field}: expected a PNG image, got {img.format}")
            w, h = img.size
            if w * h > max_pixels or w < 1 or h < 1:
                raise RequestError(400, f"{field}: image of {w}x{h} pixels is outside 1..{max_pixels} pixels")
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise RequestError(400, f"{field}: not a decodable PNG image ({type(e).__name__}: {e})") from None
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
