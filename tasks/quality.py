"""Image quality against a reference: PSNR and SSIM, per image, in numpy (pure functions).

Images are arrays shaped (..., H, W, C) (or (H, W) / (N, H, W) grey), uint8 in [0, 255] or float in
[0, ``data_range``]; uint8 inputs are read as floats in [0, 1] (``as_unit``), so every score is on the
same scale whatever the input type. Both functions return one value per leading index.
"""

from __future__ import annotations

import numpy as np

# SSIM constants of Wang, Bovik, Sheikh & Simoncelli (2004): K1, K2 and the 11-tap Gaussian window, sigma 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
PSNR_CAP_DB = 100.0  # identical images (MSE 0) score this instead of +inf, so means stay finite


def as_unit(image: np.ndarray) -> np.ndarray:
    """float64 pixels: uint8 / 255, any other dtype as it is."""
    a = np.asarray(image)
    return a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else a.astype(np.float64)


def _hwc(x: np.ndarray) -> np.ndarray:
    """(..., H, W, C) view: a grey (H, W) image gets a channel axis."""
    return x[..., None] if x.ndim == 2 else x


def psnr(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per image of the last three axes (H, W, C).

    ``PSNR = 10 * log10(data_range^2 / MSE)``, ``MSE = mean over H, W, C of (x - y)^2``; capped at
    ``PSNR_CAP_DB`` where the images are identical."""
    a, b = _hwc(as_unit(x)), _hwc(as_unit(y))
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ: {a.shape} vs {b.shape}")
    mse = ((a - b) ** 2).mean(axis=(-3, -2, -1))
    with np.errstate(divide="ignore"):
        db = 10.0 * np.log10(data_range**2 / mse)
    return np.minimum(db, PSNR_CAP_DB)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian taps: ``g_i = exp(-(i - (size-1)/2)^2 / (2 sigma^2)) / sum``."""
    i = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(i**2) / (2.0 * sigma**2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of (..., H, W, C) with ``taps`` along H then W."""
    k = taps.shape[0]
    rows = np.lib.stride_tricks.sliding_window_view(x, k, axis=-3) @ taps  # (..., H-k+1, W, C)
    return np.lib.stride_tricks.sliding_window_view(rows, k, axis=-2) @ taps  # (..., H-k+1, W-k+1, C)


def ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0, window: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Structural similarity (Wang et al. 2004) per image: the mean over positions and channels of

        SSIM = ((2 mu_x mu_y + C1) (2 s_xy + C2)) / ((mu_x^2 + mu_y^2 + C1) (s_x^2 + s_y^2 + C2)),

    ``C1 = (K1 L)^2``, ``C2 = (K2 L)^2`` (L = ``data_range``), with local means, variances and the covariance
    taken under a ``window``-tap Gaussian (``sigma``) over the positions where the window fits ('valid').
    Images smaller than the window use a window of their smaller side."""
    a, b = _hwc(as_unit(x)), _hwc(as_unit(y))
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ: {a.shape} vs {b.shape}")
    size = min(window, a.shape[-3], a.shape[-2])
    taps = gaussian_window(size, sigma)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_a, mu_b = _filter_valid(a, taps), _filter_valid(b, taps)
    var_a = _filter_valid(a * a, taps) - mu_a**2
    var_b = _filter_valid(b * b, taps) - mu_b**2
    cov = _filter_valid(a * b, taps) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(axis=(-3, -2, -1))
