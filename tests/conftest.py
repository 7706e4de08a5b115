"""Shared pytest setup.

Triton kernels run on the CPU through Triton's interpreter when no GPU is present (DESIGN §7): the
variable must be set before triton is first imported, hence here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
