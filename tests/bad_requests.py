"""A corpus of malformed HTTP requests for the Serve apps (tests/test_serve.py): broken or non-strict JSON,
wrong types, deep nesting, bad base64, images that are not images or that claim a huge size, wrong content
types, oversized bodies, unicode junk. Every one must be answered 4xx."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np

JSON = {"Content-Type": "application/json"}


def png_bytes(h: int = 8, w: int = 8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims ``w`` x ``h`` pixels, with a tiny (wrong) IDAT: what a decompression bomb
    looks like before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(
        b"IEND", b"")


def bomb_png(side: int = 20000) -> bytes:
    """A real, fully valid 1-bit PNG of ``side`` x ``side`` (compresses to ~50 KB)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _images(good_png: str) -> list[tuple[str, object]]:
    """(name, value of an image field) pairs that are not acceptable images."""
    from PIL import Image

    def encoded(fmt: str, **kw) -> str:
        buf = io.BytesIO()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format=fmt, **kw)
        return b64(buf.getvalue())

    raw = png_bytes()
    return [
        ("image_int", 5), ("image_list", [good_png]), ("image_dict", {"png": good_png}), ("image_empty", ""),
        ("image_not_base64", "%%%not base64%%%"), ("image_bad_padding", good_png[:-3]),
        ("image_base64_text", b64(b"plain bytes, not an image")), ("image_truncated_png", b64(raw[: len(raw) // 2])),
        ("image_png_magic_only", b64(raw[:8])), ("image_corrupt_idat", b64(raw[:40] + b"\x00" * 40 + raw[80:])),
        ("image_header_20000", b64(png_header_only(20000, 20000))), ("image_bomb_20000", b64(bomb_png())),
        ("image_header_zero", b64(png_header_only(0, 0))), ("image_header_wide", b64(png_header_only(2**31 - 1, 1))),
        ("image_gif", encoded("GIF")), ("image_bmp", encoded("BMP")),
        ("image_data_url_junk", "data:image/png;base64,@@@"), ("image_unicode", "\u00e9\u4e2d\u6587"),
        ("image_jpeg_truncated", encoded("JPEG")[:40]),
    ]


def _raw_bodies() -> list[tuple[str, dict, bytes]]:
    """Bodies that are not (strict, bounded) JSON, or sent with a non-JSON content type."""
    deep = lambda n, o="[", c="]": (o * n + c * n).encode()  # noqa: E731
    bodies = [
        ("empty", b""), ("whitespace", b"   \n\t "), ("open_brace", b"{"), ("close_brace", b"}"),
        ("comma_only", b"{,}"), ("missing_value", b'{"items":}'), ("trailing_comma", b'{"items": [],}'),
        ("single_quotes", b"{'items': []}"), ("comment", b'{"items": [] /* c */}'), ("bare_nan", b"NaN"),
        ("bare_infinity", b"-Infinity"), ("nan_value", b'{"items": NaN}'), ("infinity_value", b'{"x": Infinity}'),
        ("unquoted_key", b"{items: []}"), ("two_documents", b"{} {}"), ("invalid_utf8", b'{"items": "\xff\xfe"}'),
        ("utf16", json.dumps({"items": []}).encode("utf-16")), ("null_byte", b'{"items": []}\x00'),
        ("control_char", b'{"items": "a\x01b"}'), ("huge_int", b'{"items": ' + b"9" * 5000 + b"}"),
        ("deep_array_50", deep(50)), ("deep_array_100k", deep(100_000)), ("deep_object", b'{"a":' * 5000 + b"1" +
                                                                         b"}" * 5000),
        ("deep_unclosed", b"[" * 200_000), ("binary_junk", bytes(range(256)) * 4), ("bom_junk", b"\xef\xbb\xbf{"),
        ("lone_surrogate_key", b'{"\\ud800": 1}'),
        ("json_null", b"null"), ("json_true", b"true"), ("json_number", b"42"), ("json_string", b'"items"'),
        ("json_array", b"[]"), ("emoji_key", '{"\U0001f600": []}'.encode()), ("rtl_key", '{"\u202eitems": []}'.encode()),
        ("zero_width_key", '{"it\u200bems": []}'.encode()), ("nul_escape_key", b'{"items\\u0000": []}'),
        ("overlong_utf8", b'{"items": "\xc0\xaf"}'), ("cesu_surrogate", b'{"items": "\xed\xa0\x80"}'),
        ("latin1_text", '{"items": "caf\u00e9"}'.encode("latin-1")),
    ]
    out = [(name, JSON, body) for name, body in bodies]
    ok = json.dumps({"items": []}).encode()
    for ctype in ("text/plain", "multipart/form-data; boundary=x", "application/x-www-form-urlencoded",
                  "application/xml", "image/png", "\u00e9/\u00e9".encode().decode("latin-1"), "json"):
        out.append((f"content_type_{ctype[:12]}", {"Content-Type": ctype}, ok))
    out.append(("oversized_1mb", JSON, b'{"items": [], "pad": "' + b"x" * 1_100_000 + b'"}'))
    return out


def reward_requests(good_png: str) -> list[tuple[str, dict, bytes]]:
    """(name, headers, body) for ``POST /reward/score``."""
    item = lambda **kw: {"response_text": "<answer>B</answer>", **kw}  # noqa: E731
    cases: list[object] = [
        None, 1, "items", [], [{"items": []}], {"items": None}, {"items": 1}, {"items": "x"}, {"items": {}},
        {"items": [1]}, {"items": [None]}, {"items": [[]]}, {"items": [{}]}, {"items": [{"response_text": None}]},
        {"items": [{"response_text": ["a"]}]}, {"items": [{"response_text": 1.5}]},
        {"items": [{"response_text": "x" * 40_000}]}, {"items": [item(meta=[])]}, {"items": [item(meta="m")]},
        {"items": [item(meta={"answer": {"a": 1}})]}, {"items": [item(meta={"answer": [[1]]})]},
        {"items": [item(meta={"answer": ["x"] * 65})]}, {"items": [item(meta={"choices": "AB"})]},
        {"items": [item(meta={"choices": [1, 2]})]}, {"items": [item(meta={"choices": ["c"] * 27})]},
        {"items": [item(meta={"answer_type": "poem"})]}, {"items": [item(meta={"answer_type": 3})]},
        {"items": [item(meta={"rel_tol": -1})]}, {"items": [item(meta={"rel_tol": "NaN"})]},
        {"items": [item(meta={"abs_tol": 1e999})]}, {"items": [item(meta={"surprise": 1})]},
        {"items": [item(extra=1)]}, {"items": [], "extra": 1}, {"items": [item(images=[])]},
        {"items": [item(images="png")]}, {"items": [item(images={"1bad": good_png})]},
        {"items": [item(images={"k" * 65: good_png})]}, {"items": [item(images={f"k{i}": good_png for i in range(5)})]},
        {"items": [item(images={"": good_png})]}, {"items": [{"response_text": ""}] * 5000},
        {"items": [item(images={"source_image": good_png, "recon": "%%%"})]},
    ]
    out = [(f"reward_case_{i}", JSON, json.dumps(c).encode()) for i, c in enumerate(cases)]
    out += [(f"reward_{name}", JSON, json.dumps({"items": [item(images={"source_image": v})]}).encode())
            for name, v in _images(good_png)]
    return out + [(f"reward_{name}", h, b) for name, h, b in _raw_bodies()]


def policy_requests(good_png: str) -> list[tuple[str, dict, bytes]]:
    """(name, headers, body) for ``POST /policy/answer``."""
    q = lambda **kw: {"question": "What color?", **kw}  # noqa: E731
    cases: list[object] = [
        None, 1, "q", [], {}, {"question": None}, {"question": 5}, {"question": ""}, {"question": ["q"]},
        {"question": "q" * 8193}, q(choices="AB"), q(choices=[1]), q(choices=["c"] * 27), q(choices=["c" * 1025]),
        q(return_image="maybe"), q(return_image=2), q(max_new_tokens=0), q(max_new_tokens=-1),
        q(max_new_tokens=10**6), q(max_new_tokens="eight"), q(max_new_tokens=1.5), q(temperature=-1),
        q(temperature="NaN"), q(temperature=1e999), q(temperature=11), q(seed=-1), q(seed=2**64), q(seed="s"),
        q(extra=1), q(image=None, prompt="x"), {"question": {"a": 1}}, {"question": True}, q(choices=[None]),
        q(choices={"a": 1}), q(temperature=[1]), q(seed=1.5), q(return_image=None), q(max_new_tokens=None, x=[]),
    ]
    out = [(f"policy_case_{i}", JSON, json.dumps(c).encode()) for i, c in enumerate(cases)]
    out += [(f"policy_{name}", JSON, json.dumps(q(image=v)).encode()) for name, v in _images(good_png)]
    return out + [(f"policy_{name}", h, b) for name, h, b in _raw_bodies()]
