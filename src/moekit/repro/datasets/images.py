"""Image transforms on (T, I, U, X) tensors: rotation, centre crop, resize and a Gaussian blur with a
random strength per image — what the rotate task needs, without torchvision — and the random shift the
condconv and sparse-mlp runs train with.

Conventions follow torchvision's: a positive angle rotates counter-clockwise about the image centre and
uncovered pixels are filled with 0; ``resize`` is bilinear with antialiasing; the blur kernel is
``kernel_size = (width, height)`` taps with reflect padding and one σ per image for both axes.

Legend: T images, I channels, U image height, X image width (see the package legend); the public arguments
``x_NCHW`` (a (T, I, U, X) batch) and ``sigma_N`` (T σs) keep their names.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.dtype.is_floating_point:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x: expected a floating-point (T, I, U, X) tensor, got {shape}")
    return x


def rotate(x_NCHW: Tensor, degrees: float, mode: Literal["nearest", "bilinear"] = "nearest") -> Tensor:
    """Every image rotated counter-clockwise by ``degrees`` about its centre; uncovered pixels are 0.

    ``mode="nearest"`` is torchvision's default interpolation for rotations."""
    x = _check(x_NCHW)
    if not math.isfinite(degrees):
        raise ValueError(f"degrees: expected a finite angle, got {degrees}")
    T, _, U, X = x.shape
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    # affine_grid maps output coordinates (x right, y down, in [-1, 1]) to input coordinates; an image
    # turned counter-clockwise on screen samples its input at the output point turned clockwise.
    # Pixel units are made isotropic with the aspect ratio a = U / X.
    a = U / X
    theta = torch.tensor([[c, -s * a, 0.0], [s / a, c, 0.0]], dtype=x.dtype).expand(T, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def center_crop(x_NCHW: Tensor, size: int) -> Tensor:
    """The central ``size`` × ``size`` pixels (torchvision's rounding of the offsets)."""
    x = _check(x_NCHW)
    U, X = x.shape[-2:]
    if not 1 <= size <= min(U, X):
        raise ValueError(f"size: expected 1 <= size <= {min(U, X)}, got {size}")
    top, left = int(round((U - size) / 2.0)), int(round((X - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def resize(x_NCHW: Tensor, size: int) -> Tensor:
    """Bilinear resize to ``size`` × ``size`` with antialiasing (torchvision ``Resize`` on tensors)."""
    x = _check(x_NCHW)
    if size < 1:
        raise ValueError(f"size: expected >= 1, got {size}")
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def gaussian_kernels(sigma_N: Tensor, taps: int) -> Tensor:
    """One normalised 1-D Gaussian kernel per σ: ``k_i ∝ exp(−i² / 2σ²)``, i = −(taps−1)/2 … (taps−1)/2. (T, taps)."""
    if taps < 1 or taps % 2 == 0:
        raise ValueError(f"taps: expected an odd number >= 1, got {taps}")
    i = torch.arange(taps, dtype=sigma_N.dtype) - (taps - 1) / 2
    k = torch.exp(-(i[None, :] ** 2) / (2 * sigma_N[:, None] ** 2))
    return k / k.sum(1, keepdim=True)


def gaussian_blur(x_NCHW: Tensor, sigma_N: Tensor, kernel_size: tuple[int, int] = (3, 7)) -> Tensor:
    """Blur image n with a separable Gaussian of std ``sigma_N[n]`` (both axes), ``kernel_size = (width,
    height)`` taps, reflect padding — torchvision's ``GaussianBlur`` with the σ it draws per image given."""
    x = _check(x_NCHW)
    T, I, U, X = x.shape
    kw, kh = kernel_size
    sigma_N = torch.as_tensor(sigma_N, dtype=x.dtype).reshape(-1)
    if sigma_N.numel() != T or not bool((sigma_N > 0).all()):
        raise ValueError(f"sigma_N: expected {T} positive values, got {tuple(sigma_N.shape)}")
    if kw // 2 >= X or kh // 2 >= U:
        raise ValueError(f"kernel_size: {kernel_size} is too large for {U}x{X} images (reflect padding)")
    wx = gaussian_kernels(sigma_N, kw).repeat_interleave(I, 0)          # (T·I, kw)
    wy = gaussian_kernels(sigma_N, kh).repeat_interleave(I, 0)          # (T·I, kh)
    y = x.reshape(1, T * I, U, X)
    y = F.conv2d(F.pad(y, (kw // 2, kw // 2, 0, 0), mode="reflect"), wx[:, None, None, :], groups=T * I)
    y = F.conv2d(F.pad(y, (0, 0, kh // 2, kh // 2), mode="reflect"), wy[:, None, :, None], groups=T * I)
    return y.reshape(T, I, U, X)


def random_shift(x_NCHW: Tensor, max_shift: int, generator: torch.Generator, fill: float) -> Tensor:
    """Each image moved by its own random (dy, dx) ∈ [-max_shift, max_shift]² pixels, the uncovered border
    filled with ``fill`` (the background value): pad the batch by ``max_shift`` on every side and cut one
    U × X window per image at offset (s + dy, s + dx). ``max_shift=0`` returns ``x_NCHW`` and draws nothing."""
    if max_shift == 0:
        return x_NCHW
    B, I, U, X = _check(x_NCHW).shape
    s = max_shift
    padded = F.pad(x_NCHW, (s, s, s, s), value=fill)
    off_B2 = torch.randint(0, 2 * s + 1, (B, 2), generator=generator)        # window corner (row, column)
    rows_BU = off_B2[:, :1] + torch.arange(U)                                  # (B, U) rows of each window
    cols_BX = off_B2[:, 1:] + torch.arange(X)                                  # (B, X) columns of each window
    return padded[torch.arange(B)[:, None, None, None], torch.arange(I)[None, :, None, None],
                  rows_BU[:, None, :, None], cols_BX[:, None, None, :]]      # (B, I, U, X)


__all__ = ["center_crop", "gaussian_blur", "gaussian_kernels", "random_shift", "resize", "rotate"]
