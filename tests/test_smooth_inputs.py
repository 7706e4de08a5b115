"""Bad input to the Python API gets a clear ValueError naming the argument, never a shape error from
inside the model (a table, as the CLI's error tests); the inputs that are fine are accepted as such."""

import numpy as np
import pytest
import torch
from torch import nn

from fastsmooth import Gaussian, Smooth

K = np.arange(16, dtype=np.uint8).reshape(1, 4, 4) * 16


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


CALLS = {
    "certify": lambda s, x, **kw: s.certify(x, n0=10, n=50, **kw),
    "predict": lambda s, x, **kw: s.predict(x, n=50, **kw),
    "probabilities": lambda s, x, **kw: s.probabilities(x, n=50, **kw),
    "certify_many": lambda s, x, **kw: list(s.certify_many([(0, x)], n0=10, n=50)),
    "predict_many": lambda s, x, **kw: list(s.predict_many([(0, x)], n=50)),
}

BAD = [
    # (case, x, Smooth's input_grid, call arguments, message)
    ("a batch", torch.rand(4, 1, 4, 4), None, {}, r"one input of shape \(C, H, W\).*certify_many"),
    ("a batch of one", torch.rand(1, 1, 4, 4), None, {}, r"one input of shape"),
    ("a scalar", torch.tensor(0.5), None, {}, r"one input of shape"),
    ("a list", [[0.0] * 4] * 4, None, {}, r"torch tensor or a numpy array"),
    ("0-255 integers", torch.from_numpy(K.astype(np.int64)), None, {}, r"dtype int64: sigma is in the units"),
    ("uint8 without the grid", torch.from_numpy(K), None, {}, r"uint8 pixels: pass input_grid=255"),
    ("booleans", torch.ones(1, 4, 4, dtype=torch.bool), None, {}, r"dtype bool"),
    ("a NaN pixel", torch.tensor(K / 255.0, dtype=torch.float32).index_put_((torch.tensor([0]),) * 3,
                                                                           torch.tensor(float("nan"))),
     None, {}, r"NaN or inf"),
    ("an inf pixel", torch.full((1, 4, 4), float("inf")), None, {}, r"NaN or inf"),
    ("off the grid", torch.full((1, 4, 4), 0.5), 255, {}, r"not on the grid 1/255"),
    ("an empty input", torch.empty(1, 0, 4), None, {}, r"empty"),
]


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("case,x,grid,kwargs,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_clearly(call, case, x, grid, kwargs, message):
    smooth = Smooth(model(), 3, Gaussian(sigma=0.25), precision="fp32", input_grid=grid)
    with pytest.raises(ValueError, match=message):
        CALLS[call](smooth, x, **kwargs)


@pytest.mark.parametrize("index", [-1, 2 ** 32, 1.5, True])
def test_bad_image_index(index):
    smooth = Smooth(model(), 3, Gaussian(sigma=0.25), precision="fp32")
    with pytest.raises(ValueError, match="image_index"):
        smooth.certify(torch.zeros(1, 4, 4), n0=10, n=50, image_index=index)


def test_certify_many_takes_pairs():
    smooth = Smooth(model(), 3, Gaussian(sigma=0.25), precision="fp32")
    with pytest.raises(ValueError, match=r"\(image_index, x\) pairs"):
        list(smooth.certify_many([torch.zeros(1, 4, 4)], n0=10, n=50))


def test_good_inputs_are_accepted_alike():
    """A numpy array, a float tensor and (on the grid) the uint8 indices themselves are one input."""
    smooth = Smooth(model(), 3, Gaussian(sigma=0.25), precision="fp32", input_grid=255)
    x = torch.from_numpy(K) / 255.0
    ref = smooth.certify(x, n0=10, n=300, image_index=1)
    for same in (x.numpy(), torch.from_numpy(K), K, x.double()):
        cert = smooth.certify(same, n0=10, n=300, image_index=1)
        assert torch.equal(cert.counts, ref.counts) and torch.equal(cert.counts0, ref.counts0)
    assert smooth.certify(x.flatten(), n0=10, n=50).counts.sum() == 50            # a vector input
