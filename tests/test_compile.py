"""torch.compile for real (issues 4 and 15): the compiled path is taken (dynamo compiled the frame,
inductor froze the weights, every forward of certify went through the compiled model), it votes as
the eager model does, and it is recorded with the results."""

import pytest
import torch
from torch._dynamo.utils import counters

import fastsmooth
from fastsmooth.models import get_architecture


@pytest.mark.slow  # inductor compiles C++ for the CPU: about 10 s here
def test_compiled_model_is_used_votes_like_eager_and_is_recorded(compiled_calls):
    calls = compiled_calls                  # into a cold inductor cache
    torch.manual_seed(0)
    model = get_architecture("cnn", "digits").eval()
    x = torch.rand(1, 8, 8)
    noise = fastsmooth.Gaussian(sigma=0.5)
    eager = fastsmooth.Smooth(model, 10, noise, precision="fp32", compile="off")
    a = eager.certify(x, n0=50, n=500, batch_size=128, image_index=0)
    assert calls == []
    counters.clear()
    compiled = fastsmooth.Smooth(model, 10, noise, precision="fp32", compile=True)
    b = compiled.certify(x, n0=50, n=500, batch_size=128, image_index=0)
    # dynamo compiled one frame into a graph, and inductor froze the weights (conv + BN folded,
    # weights prepacked for oneDNN): the freezing passes ran, so freezing was in effect
    assert counters["frames"]["ok"] >= 1 and counters["stats"]["unique_graphs"] >= 1
    assert counters["inductor"]["binary_folding"] > 0
    # every model call of certify (550 copies in batches of 128: 5 calls) was the compiled one,
    # each of the one compiled size; plus the compile and the timing calls before them
    assert len(calls) >= 5 and set(calls) == {128}
    # Compiled kernels may round differently in the last bits; a vote flips only on a near tie.
    assert (a.counts - b.counts).abs().sum() <= 2 and a.prediction == b.prediction
    assert compiled.metadata["compile"] is True and eager.metadata["compile"] is False
    assert compiled.sampler.compile_seconds > 0 and eager.sampler.compile_seconds == 0
    assert compiled.metadata["compile_seconds"] > 0
