"""pytest setup for the benchmark suites: Triton's interpreter when no GPU is present (DESIGN §7)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
