"""Triton where it is installed; elsewhere a stand-in decorator, so that the torch twins written beside
the Triton samplers (samplers.py, philox.py) import on any platform (pyproject installs Triton on
Linux x86_64 only). Without Triton the Triton functions are never called."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    tl = None

HAVE_TRITON = triton is not None


def jit(fn=None, **options):
    """``triton.jit``, or a decorator that leaves the function as it is."""
    if HAVE_TRITON:
        return triton.jit(fn, **options) if fn is not None else triton.jit(**options)
    return fn if fn is not None else (lambda f: f)
