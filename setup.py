# Metadata lives in pyproject.toml. This file adds the native CPU noise sampler (fastsmooth/native/noise.c,
# plain C, no torch headers): built by `pip install -e .` where a C compiler is present; optional, so that
# an install without one still works (the engine then falls back to the torch backend, and says so).
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fastsmooth._native_noise",
            sources=["fastsmooth/native/noise.c"],
            # ISO float semantics: no fused multiply-add (the kernels' float32 operations), no fast-math;
            # errno is never read, so sqrt and rounding may be inlined and vectorized.
            # OpenMP: the fill runs on the team torch's intra-op work uses (native_backend.py).
            extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
)
