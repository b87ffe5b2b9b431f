"""Image degradations, numpy + Pillow only.

One vocabulary: ``CORRUPTIONS``, an MMD-Bench-style suite (as used by CLEAR) of 16 corruptions in 4
categories (capture, transmission, environment, post-processing) at intensities in (0, 1], evaluated at
``LEVELS = (0.23, 0.45, 0.9)``: ``degrade(image, type, intensity, seed, index)``, or by severity 1-3
(intensity ``LEVELS[severity - 1]``): ``apply_degradation(image, type, severity, seed, index)``. The
default task draws from ``DEFAULT_DEGRADATIONS`` (defocus blur, Gaussian noise, JPEG, low light).

Every function takes and returns an (H, W, 3) uint8 array and draws its randomness from a numpy
Generator seeded from (seed, image index, corruption name), so a result is a pure function of those.
Pixel-sized parameters scale with the image size, so the suite behaves alike on 32 px and 512 px images.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

LEVELS: tuple[float, float, float] = (0.23, 0.45, 0.9)
SEVERITY_TO_INTENSITY: dict[int, float] = {1: LEVELS[0], 2: LEVELS[1], 3: LEVELS[2]}
CATEGORIES = ("capture", "transmission", "environment", "post_processing")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")

CorruptionFn = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


# ----------------------------------------------------------------------------- helpers


def make_rng(seed: int, index: int, name: str) -> np.random.Generator:
    """A Generator that depends only on (seed, image index, corruption name)."""
    mask = (1 << 64) - 1
    return np.random.default_rng([int(seed) & mask, int(index) & mask, zlib.crc32(name.encode())])


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Validate / coerce an image to (H, W, 3) uint8 (gray is stacked, alpha dropped)."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"expected an (H, W, 3) image, got shape {a.shape}")
    a = a[..., :3]
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and float(np.nanmax(a)) <= 1.0:
            a = a * 255.0
        a = np.clip(np.nan_to_num(a.astype(np.float64)), 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(a)


def _f(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float32)


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _side(img: np.ndarray) -> int:
    return int(min(img.shape[0], img.shape[1]))


def _pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(img) if img.dtype == np.uint8 else Image.fromarray(_u8(img))


def _convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2-D convolution of every channel of float (H, W, C) with a normalised kernel (reflect padding, FFT)."""
    k = kernel.astype(np.float64)
    k = k / k.sum()
    kh, kw = k.shape
    ph, pw = kh // 2, kw // 2
    mode = "reflect" if min(x.shape[0], x.shape[1]) > max(ph, pw) else "edge"
    xp = np.pad(x.astype(np.float64), ((ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)), mode=mode)
    H, W = xp.shape[:2]
    fk = np.fft.rfft2(k, s=(H, W))
    out = np.fft.irfft2(np.fft.rfft2(xp, axes=(0, 1)) * fk[..., None], s=(H, W), axes=(0, 1))
    return out[kh - 1 :, kw - 1 :][: x.shape[0], : x.shape[1]].astype(np.float32)


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    r = max(1, int(np.ceil(3 * sigma)))
    t = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-(t**2) / (2 * sigma**2))
    return _convolve(x, np.outer(g, g))


def _smooth_noise(rng: np.random.Generator, h: int, w: int, grid: int) -> np.ndarray:
    """Low-frequency noise (h, w) float32: a random grid x grid field upsampled bicubically."""
    g = rng.standard_normal((grid, grid)).astype(np.float32)
    return np.asarray(Image.fromarray(g).resize((w, h), Image.BICUBIC), dtype=np.float32)


def _bilinear_sample(img: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Sample float (H, W, C) at float coordinates (clamped to the border)."""
    H, W = img.shape[:2]
    ys = np.clip(ys, 0, H - 1)
    xs = np.clip(xs, 0, W - 1)
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    y1 = np.minimum(y0 + 1, H - 1)
    x1 = np.minimum(x0 + 1, W - 1)
    wy = (ys - y0)[..., None]
    wx = (xs - x0)[..., None]
    top = img[y0, x0] * (1 - wx) + img[y0, x1] * wx
    bot = img[y1, x0] * (1 - wx) + img[y1, x1] * wx
    return top * (1 - wy) + bot * wy


def _jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    _pil(img).save(buf, format="JPEG", quality=int(np.clip(quality, 1, 95)))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.uint8).copy()


def _at_levels(intensity: float, values: tuple[float, float, float], at_zero: float, at_one: float) -> float:
    """Piecewise-linear in intensity through ``values`` at ``LEVELS`` (and the two end points)."""
    return float(np.interp(intensity, (0.0, *LEVELS, 1.0), (at_zero, *values, at_one)))


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# ----------------------------------------------------------------------------- capture


def defocus_blur(img: np.ndarray, intensity: float, rng: np.random.Generator) -> np.ndarray:
    """Out-of-focus lens: convolution with an anti-aliased disk whose radius grows with intensity."""
    radius = 0.5 + intensity * _side(img) * 0.08
    r = int(np.ceil(radius)) + 1
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = np.clip(radius + 0.5 - np.sqrt(xx**2 + yy**2), 0.0, 1.0)
    return _u8(_convolve(_f(img), disk))


def motion_blur(img: np.ndarray, intensity: float, rng: np.random.Generator) -> np.ndarray:
    """Camera shake: convolution with a line kernel of random angle, length growing with intensity."""
    length = 1.5 + intensity * _side(img) * 0.15
    angle = rng.uniform(0, np.pi)
    r = int(np.ceil(length / 2)) + 1
    k = np.zeros((2 * r + 1, 2 * r + 1), dtype=np.float64)
    for t in np.linspace(-length / 2, length / 2, max(8, int(length * 4))):
        y, x = r + t * np.sin(angle), r + t * np.cos(angle)
        y0, x0 = int(np.floor(y)), int(np.floor(x))
        fy, fx = y - y0, x - x0
        k[y0, x0] += (1 - fy) * (1 - fx)
        k[y0, x0 + 1] += (1 - fy) * fx
        k[y0 + 1, x0] += fy * (1 - fx)
        k[y0 + 1, x0 + 1] += fy * fx
    return _u8(_convolve(_f(img), k))


def gaussian_noise(img: np.ndarray, intensity: float, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise: additive zero-mean Gaussian noise, std 12 / 25 / 45 (of 255) at the three levels."""
    sigma = _at_levels(intensity, (12.0, 25.0, 45.0), 0.0, 50.0)
    return _u8(_f(img) + rng.normal(0.0, sigma, size=img.shape).astype(np.float32))


def low_light(img: np.ndarray, intensity: float, rng: np.random.Generator) -> np.ndarray:
    """Underexposure: (gamma, gain) (1.3, 0.7) / (1.7, 0.5) / (2.2, 0.3) at the levels, slight read noise."""
    gamma, gain = _at_levels(intensity, (1.3, 1.7, 2.2), 1.0, 2.4), _at_levels(intensity, (0.7, 0.5, 0.3), 1.0, 0.25)
    x = (_f(img) / 255.0) ** gamma * gain
    x = x + rng.normal(0.0, 0.01 * intensity, size=img.shape).astype(np.float32)
    return _u8(x * 255.0)


# ----------------------------------------------------------------------------- transmission


def jpeg_compression(img: np.ndarray, intensity: float, rng: np.random.Generator) -> np.ndarray:
    """Lossy JPEG round trip at quality 30 / 15 / 6 at the three levels."""
    return _jpeg_roundtrip(img, int(round(_at_levels(intensity, (30.0, 15.0, 6.0), 50.0, 4.0))))


def pixelate(img: np.ndarray, intensity: float, rng: np.random.Generator) -> np.ndarray:
    """Low-resolution stream: box downsampling by a factor growing with intensity, nearest upsampling."""
    H, W = img.shape[:2]
    factor = 1.0 + intensity * _side(img) * 0.12
    small = (max(1, int(round(W / factor))), max(1, int(round(H / factor))))
    return np.asarray(_pil(img).resize(small, Image.BOX).resize((W, H), Image.NEAREST), dtype=np.uint8)


def packet_loss(img: np.ndarray, intensity: float, rng: np.random.Generator) -> np.ndarray:
    """Dropped packets: runs of macroblocks replaced by black / green blocks or a stale copy from above."""
    H, W = img.shape[:2]
    b = max(4, _side(img) // 8)
    gh, gw = -(-H // b), -(-W // b)
    p = 0.04 + 0.3 * intensity
    lost = np.zeros((gh, gw), dtype=bool)
    starts = rng.random((gh, gw)) < p * 0.5
    for i, j in zip(*np.nonzero(starts)):  # a lost packet takes a run of consecutive blocks
        lost[i, j : j + 1 + int(rng.integers(0, 3))] = True
    if not lost.any():
        lost[rng.integers(gh), rng.integers(gw)] = True
    out = img.copy()
    for i, j in zip(*np.nonzero(lost)):
        ys, xs = slice(i * b, min(H, (i + 1) * b)), slice(j * b, min(W, (j + 1) * b))
        kind = rng.integers(3)
        block = out[ys, xs]
        if kind == 0 or i == 0:
            fill = np.array([0, 0, 0] if kind == 0 else [0, 150, 0], dtype=np.uint8)
            if np.all(block == fill):
                fill = 255 - fill
            out[ys, xs] = fill
        else:  # error concealment gone wrong: repeat the block above, shifted in colour
            above = out[(i - 1) * b : i * b, xs][: block.shape[0]]
            out[ys, xs][: above.shape[0]] = _u8(_f(above) * 0.6 + 40)
    return out


def quantization(img: np.ndarray, intensity: float, rng: np.random.Generator) -> np.ndarray:
    """Bit-depth reduction: round(6.5 - 5 * intensity) bits per channel, bin centres."""
    bits = int(np.clip(round(6.5 - 5.0 * intensity), 1, 7))
    step = 256 // (1 << bits)
    return ((img.astype(np.int32) // step) * step + step // 2).astype(np.uint8)


# ----------------------------------------------------------------------------- environment


def fog(img: np.ndarray, intensity: float, rng: np.random.Generator) -> np.ndarray:
    """Haze: blend towards a light fog colour with a spatially varying, low-frequency density."""
    H, W = img.shape[:2]
    density = _smooth_noise(rng, H, W, 3) + 0.5 * _smooth_noise(rng, H, W, 7)
    density = (density - density.min()) / (np.ptp(density) + 1e-6)
    alpha = (intensity * (0.55 + 0.4 * density))[..., None]
    colour = np.float32(rng.uniform(200, 235))
    return _u8(_f(img) * (1 - alpha) + colour * alpha)


def rain(img: np.ndarray, intensity: float, rng: np.random.Generator) -> np.ndarray:
    """Rain streaks: slanted bright lines (count and length grow with intensity), slight darkening."""
    H, W = img.shape[:2]
    side = _side(img)
    n = 1 + int(H * W * intensity * 0.02)
    length = side * (0.1 + 0.2 * intensity)
    angle = np.deg2rad(rng.uniform(-20, 20))
    dx, dy = length * np.sin(angle), length * np.cos(angle)
    layer = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(layer)
    width = max(1, side // 128)
    for _ in range(n):
        x, y = rng.uniform(-abs(dx), W), rng.uniform(-length, H)
        draw.line([(x, y), (x + dx, y + dy)], fill=int(rng.uniform(150, 255)), width=width)
    layer = layer.filter(ImageFilter.GaussianBlur(radius=max(0.3, side / 256)))
    streaks = np.asarray(layer, dtype=np.float32)[..., None] / 255.0
    base = _f(img) * (1 - 0.25 * intensity)
    return _u8(base * (1 - 0.8 * streaks) + 235.0 * 0.8 * streaks)


def snow(img: np.ndarray, intensity: float, rng: np.random.Generator) -> np.ndarray:
    """Snowfall: white flakes of random size plus a whitening veil, both growing with intensity."""
    H, W = img.shape[:2]
    side = _side(img)
    n = 1 + int(H * W * intensity * 0.015)
    layer = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(layer)
    for _ in range(n):
        x, y = rng.uniform(0, W), rng.uniform(0, H)
        r = rng.uniform(0.4, 0.6 + side / 80)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=int(rng.uniform(180, 255)))
    flakes = np.asarray(layer, dtype=np.float32)[..., None] / 255.0
    veil = 0.35 * intensity
    base = _f(img) * (1 - veil) + 230.0 * veil
    return _u8(base * (1 - flakes) + 255.0 * flakes)


def shadow_glare(img: np.ndarray, intensity: float, rng: np.random.Generator) -> np.ndarray:
    """Uneven lighting: a hard shadow over a random half-plane plus a bright glare spot."""
    H, W = img.shape[:2]
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    py, px = rng.uniform(0.25, 0.75) * H, rng.uniform(0.25, 0.75) * W
    side_of_line = (xx - px) * np.cos(theta) + (yy - py) * np.sin(theta)
    shade = 1.0 - 0.55 * intensity * (1.0 / (1.0 + np.exp(-side_of_line / max(0.5, _side(img) / 64))))
    gy, gx = rng.uniform(0, H), rng.uniform(0, W)
    spread = _side(img) * rng.uniform(0.2, 0.35)
    glare = 255.0 * 0.9 * intensity * np.exp(-((yy - gy) ** 2 + (xx - gx) ** 2) / (2 * spread**2))
    return _u8(_f(img) * shade[..., None] + glare[..., None])


# ----------------------------------------------------------------------------- post-processing


def oversharpen(img: np.ndarray, intensity: float, rng: np.random.Generator) -> np.ndarray:
    """Over-sharpening: unsharp mask with amount 1 + 8 * intensity (halos, clipped edges)."""
    x = _f(img)
    sigma = max(0.8, _side(img) / 64)
    return _u8(x + (1.0 + 8.0 * intensity) * (x - _gaussian_blur(x, sigma)))


def contrast_reduction(img: np.ndarray, intensity: float, rng: np.random.Generator) -> np.ndarray:
    """Washed-out image: pull every pixel towards the mean by 1 - 0.8 * intensity."""
    x = _f(img)
    m = x.mean()
    return _u8(m + (x - m) * (1.0 - 0.8 * intensity))


def saturation_shift(img: np.ndarray, intensity: float, rng: np.random.Generator) -> np.ndarray:
    """Colour-grading error: hue rotation (random sign) and de- or over-saturation, scaled by intensity."""
    x = _f(img)
    gray = (x @ _LUMA)[..., None]
    chroma = x - gray
    theta = rng.choice([-1.0, 1.0]) * intensity * np.pi / 2
    # rotate chroma around the gray axis (Rodrigues' formula with axis (1, 1, 1) / sqrt(3))
    k = np.ones(3, dtype=np.float32) / np.sqrt(3.0)
    kx = np.cross(k, chroma)
    kd = (chroma @ k)[..., None] * k
    chroma = chroma * np.cos(theta) + kx * np.sin(theta) + kd * (1 - np.cos(theta))
    scale = 1.0 - 0.8 * intensity if rng.random() < 0.5 else 1.0 + 1.5 * intensity
    return _u8(gray + chroma * scale)


def elastic_warp(img: np.ndarray, intensity: float, rng: np.random.Generator) -> np.ndarray:
    """Geometric warp: a smooth random displacement field of amplitude ~ intensity * 8% of the side."""
    H, W = img.shape[:2]
    alpha = intensity * _side(img) * 0.08
    dy = _smooth_noise(rng, H, W, 4) * alpha
    dx = _smooth_noise(rng, H, W, 4) * alpha
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    return _u8(_bilinear_sample(_f(img), yy + dy, xx + dx))


CORRUPTIONS: dict[str, tuple[str, CorruptionFn]] = {
    "defocus_blur": ("capture", defocus_blur),
    "motion_blur": ("capture", motion_blur),
    "gaussian_noise": ("capture", gaussian_noise),
    "low_light": ("capture", low_light),
    "jpeg_compression": ("transmission", jpeg_compression),
    "pixelate": ("transmission", pixelate),
    "packet_loss": ("transmission", packet_loss),
    "quantization": ("transmission", quantization),
    "fog": ("environment", fog),
    "rain": ("environment", rain),
    "snow": ("environment", snow),
    "shadow_glare": ("environment", shadow_glare),
    "oversharpen": ("post_processing", oversharpen),
    "contrast_reduction": ("post_processing", contrast_reduction),
    "saturation_shift": ("post_processing", saturation_shift),
    "elastic_warp": ("post_processing", elastic_warp),
}


def corruptions_in(category: str) -> list[str]:
    """Names of the suite's corruptions in one category."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; known: {list(CATEGORIES)}")
    return [n for n, (c, _) in CORRUPTIONS.items() if c == category]


def degrade(image: np.ndarray, type: str, intensity: float, seed: int = 0, index: int = 0) -> np.ndarray:
    """Apply one suite corruption at ``intensity`` in (0, 1].

    Deterministic: the result depends only on (image, type, intensity, seed, index).
    """
    if type not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {type!r}; known: {sorted(CORRUPTIONS)}")
    intensity = float(intensity)
    if not 0.0 < intensity <= 1.0:
        raise ValueError(f"intensity must be in (0, 1], got {intensity}")
    return CORRUPTIONS[type][1](as_rgb_uint8(image), intensity, make_rng(seed, index, type))


DEFAULT_DEGRADATIONS: tuple[str, ...] = ("defocus_blur", "gaussian_noise", "jpeg_compression", "low_light")


def apply_degradation(
    image: np.ndarray, type: str, severity: int, seed: int = 0, index: int = 0
) -> np.ndarray:
    """Apply a suite corruption at severity 1-3 (intensity ``LEVELS[severity - 1]``)."""
    if severity not in SEVERITY_TO_INTENSITY:
        raise ValueError(f"severity must be 1, 2 or 3, got {severity!r}")
    return degrade(image, type, SEVERITY_TO_INTENSITY[int(severity)], seed, index)


# ----------------------------------------------------------------------------- folders


def load_image_file(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8; a missing or corrupt file raises ValueError naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {type(e).__name__}: {e}") from e


def degrade_folder(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    types: Iterable[str] | None = None,
    seed: int = 0,
) -> Path:
    """Corrupt every image of ``in_dir`` with one suite corruption at all three ``LEVELS``.

    The corruption of an image is chosen from ``types`` (default: all 16) with a Generator seeded from
    (seed, file name), so it does not depend on what else is in the folder. Writes
    ``out_dir/<level>/<stem>.png`` (level = "0.23", "0.45", "0.9") and ``out_dir/manifest.json``
    (a list of {file, source, type, category, intensity, level}); returns the manifest path.
    A corrupt or unreadable image raises ValueError naming the file (before anything is written).
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    names = sorted(types) if types is not None else list(CORRUPTIONS)
    unknown = [t for t in names if t not in CORRUPTIONS]
    if unknown or not names:
        raise ValueError(f"unknown corruption types {unknown}; known: {list(CORRUPTIONS)}")
    if not in_dir.is_dir():
        raise ValueError(f"input folder {os.fspath(in_dir)!r} does not exist")
    files = sorted(p for p in in_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    stems = [p.stem for p in files]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise ValueError(f"several input images share the names {dupes}; outputs would collide")
    images = [(p, load_image_file(p)) for p in files]  # fail on a bad file before writing anything

    entries = []
    for path, img in images:
        key = zlib.crc32(path.name.encode())
        kind = names[int(np.random.default_rng([int(seed) & ((1 << 64) - 1), key]).integers(len(names)))]
        for level in LEVELS:
            rel = Path(str(level)) / f"{path.stem}.png"
            (out_dir / rel.parent).mkdir(parents=True, exist_ok=True)
            out = degrade(img, kind, level, seed=seed, index=key)
            Image.fromarray(out).save(out_dir / rel)
            entries.append(
                {
                    "file": rel.as_posix(),
                    "source": path.name,
                    "type": kind,
                    "category": CORRUPTIONS[kind][0],
                    "intensity": level,
                    "level": str(level),
                }
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "manifest.json"
    tmp = out_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps({"seed": seed, "levels": list(LEVELS), "images": entries}, indent=1))
    os.replace(tmp, manifest)
    return manifest
