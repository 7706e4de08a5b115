"""Model factories for `fastsmooth certify --model _cli_models:NAME` in the CLI tests.

pytest puts tests/ on sys.path (for subprocesses and torchrun the tests pass PYTHONPATH=tests), so
`--model _cli_models:cnn` names a function here. Every factory is deterministic.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from fastsmooth.models import get_architecture

# The CLI soundness simulation: an axis-aligned linear classifier on the 8x8 digits.
AXIS_PIXEL = 19          # row 2, column 3: its values spread over 0/16 .. 16/16
AXIS_THRESHOLD = 0.47    # between 7/16 and 8/16: no image sits on the boundary
AXIS_CLASSES = (3, 7)    # the class below / above the threshold


def cnn() -> nn.Module:
    """The small CNN for digits with fixed random weights; with $FASTSMOOTH_TEST_SLEEP set, each
    forward first sleeps that many seconds (a slow model, to kill a run in its middle)."""
    torch.manual_seed(0)
    model = get_architecture("cnn", "digits").eval()
    delay = float(os.environ.get("FASTSMOOTH_TEST_SLEEP", "0") or 0)
    return _Slow(model, delay) if delay > 0 else model


class _Slow(nn.Module):
    def __init__(self, model, delay):
        super().__init__()
        self.model, self.delay = model, delay

    def forward(self, x):
        time.sleep(self.delay)
        return self.model(x)


class AxisClassifier(nn.Module):
    """f(x) = AXIS_CLASSES[x[AXIS_PIXEL] > AXIS_THRESHOLD] over 10 classes (the others never win)."""

    def forward(self, x):
        z = x.flatten(1)[:, AXIS_PIXEL].float() - AXIS_THRESHOLD
        logits = torch.full((x.shape[0], 10), -1e9, dtype=torch.float32, device=x.device)
        logits[:, AXIS_CLASSES[0]] = 0.0
        logits[:, AXIS_CLASSES[1]] = z
        return logits


def axis_classifier() -> nn.Module:
    return AxisClassifier()


def three_logits() -> nn.Module:
    """Output width 3 for a 10-class data set."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


def flat_linear_100() -> nn.Module:
    """Expects 100 input elements; an 8x8 image has 64 (a RuntimeError from the forward)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(100, 10))


class _OneAtATime(nn.Module):
    def forward(self, x):
        if x.shape[0] != 1:
            raise RuntimeError(f"expected a batch of one input, got {x.shape[0]}")
        return torch.zeros((1, 10))


def one_at_a_time() -> nn.Module:
    """Accepts one clean image (the CLI's probe) but fails on batches of noisy copies."""
    return _OneAtATime()


def not_a_model():
    return "a string"
