"""Opt-in torch.compile (issue 4): same votes as the eager model, and recorded with the results."""

import pytest
import torch

import fastsmooth
from fastsmooth.models import get_architecture


@pytest.mark.slow  # inductor compiles C++ for the CPU: about 10 s here
def test_compiled_model_votes_like_eager_and_is_recorded():
    torch.manual_seed(0)
    model = get_architecture("cnn", "digits").eval()
    x = torch.rand(1, 8, 8)
    noise = fastsmooth.Gaussian(sigma=0.5)
    eager = fastsmooth.Smooth(model, 10, noise, precision="fp32")
    compiled = fastsmooth.Smooth(model, 10, noise, precision="fp32", compile=True)
    a = eager.certify(x, n0=50, n=500, batch_size=128, image_index=0)
    b = compiled.certify(x, n0=50, n=500, batch_size=128, image_index=0)
    # Compiled kernels may round differently in the last bits; a vote flips only on a near tie.
    assert (a.counts - b.counts).abs().sum() <= 2 and a.prediction == b.prediction
    assert compiled.metadata["compile"] is True and eager.metadata["compile"] is False
    assert compiled.sampler.compile_seconds > 0 and eager.sampler.compile_seconds == 0
