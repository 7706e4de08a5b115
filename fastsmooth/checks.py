"""Validators and error-message helpers that several modules share (one home for each check).

Each raises ``ValueError`` naming the argument, so that bad input to the Python API or the command
line fails with one clear line instead of an error from deep inside torch or SciPy.
"""

from __future__ import annotations

import math

NORMS = ("l1", "l2", "linf")


def check_norm(norm: str, norms=NORMS, what: str = "norm") -> str:
    """``norm`` if it is one of ``norms``, else ValueError."""
    if norm not in norms:
        raise ValueError(f"unknown {what} {norm!r}; expected one of {', '.join(norms)}")
    return norm


def positive_float(value, what: str) -> float:
    """A finite number > 0 (Python, numpy or 0-d torch scalars; not bool) as a float, or ValueError."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    return number


def check_positive_int(name: str, value) -> int:
    """``value`` as an int if it is a positive integer (not bool), else ValueError."""
    try:
        ok = not isinstance(value, bool) and int(value) == value and value > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_dim(dim: int) -> int:
    """The number of input elements d: a positive integer."""
    return check_positive_int("dim", dim)


def check_alpha(alpha: float) -> float:
    """A failure probability in (0, 1)."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}") from None
    if not 0.0 < value < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    return value


def check_image(x, input_grid=None, what: str = "x"):
    """One input of the smoothed classifier as a torch tensor: (C, H, W), or (d,) / (H, W) for models
    on such inputs; a numpy array is converted. Refused with a ValueError naming ``what``: a batch
    (use certify_many / predict_many), NaN or inf, and integer pixels except uint8 grid indices under
    ``input_grid`` (sigma is in the units of the model's float input: 0-255 integers would make it
    mean 1/255 of what is meant)."""
    import numpy as np
    import torch

    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch tensor or a numpy array of shape (C, H, W), got {type(x).__name__}")
    if x.dim() == 0 or x.dim() > 3:
        hint = "; for several images use certify_many / predict_many with (index, image) pairs" if x.dim() > 3 else ""
        raise ValueError(f"{what} must be one input of shape (C, H, W), got shape {tuple(x.shape)}{hint}")
    if x.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)})")
    if x.dtype == torch.uint8:
        if input_grid is None:
            raise ValueError(f"{what} holds uint8 pixels: pass input_grid=255 (x is then the grid index k, the "
                             "model sees k / 255) or convert it to floats in the model's input units")
        return x
    if x.dtype == torch.bool or not (x.dtype.is_floating_point or x.dtype.is_complex):
        raise ValueError(f"{what} has dtype {str(x.dtype).replace('torch.', '')}: sigma is in the units of the "
                         "model's float input, so convert it (e.g. x.float() / 255 for 8-bit pixels), or pass "
                         "uint8 pixels with input_grid=255")
    if x.dtype.is_complex:
        raise ValueError(f"{what} is complex; expected real pixels")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contains NaN or inf")
    return x


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
