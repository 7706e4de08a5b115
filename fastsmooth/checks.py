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


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
