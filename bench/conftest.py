"""pytest setup for the benchmark suites: Triton's interpreter when no GPU is present (DESIGN §7)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# What the command line runs with (fastsmooth/allocator.py): the suites measure the same engine.
from fastsmooth.allocator import tune_cpu_allocator  # noqa: E402

tune_cpu_allocator()
