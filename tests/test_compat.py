"""fastsmooth.compat.cohen.Smooth: the face of Cohen et al.'s core.Smooth on fastsmooth's engine."""

import datetime
import math
from time import time

import numpy as np
import pytest
import torch
from scipy.stats import beta

from fastsmooth.compat.cohen import Smooth
from fastsmooth.noises import Laplace
from fastsmooth.results import read_results

SHAPE = (1, 6, 6)
DIM = math.prod(SHAPE)
NUM_CLASSES = 3


class Linear(torch.nn.Module):
    """Class 0 when u.z > t, class 1 otherwise; class 2 never (a constant low logit)."""

    def __init__(self, u: torch.Tensor, t: float):
        super().__init__()
        self.register_buffer("u", u.reshape(-1).float())
        self.t = float(t)

    def forward(self, z):
        s = z.flatten(1).float() @ self.u - self.t
        return torch.stack([s, -s, torch.full_like(s, -100.0)], dim=1)


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(DIM, generator=g)
    u /= u.norm()
    model = Linear(u, t=0.2)
    return model, u, g


def _image(u, t, signed_distance, g):
    """An image at signed l2 distance ``signed_distance`` from the hyperplane u.z = t (> 0: class 0)."""
    v = torch.randn(DIM, generator=g)
    v -= (v @ u) * u  # orthogonal to u
    return ((t + signed_distance) * u + 0.5 * v).reshape(SHAPE)


class Args:  # what Cohen's certify.py gets from argparse
    N0, N, alpha, batch, skip, max = 100, 2000, 0.001, 500, 1, -1


def cohen_certify_script(Smooth, base_classifier, dataset, num_classes, sigma, args, outfile):
    """Cohen et al.'s certify.py loop, written against core.Smooth's API (only the import differs)."""
    smoothed_classifier = Smooth(base_classifier, num_classes, sigma)
    f = open(outfile, 'w')
    print("idx\tlabel\tpredict\tradius\tcorrect\ttime", file=f, flush=True)
    for i in range(len(dataset)):
        if i % args.skip != 0:
            continue
        if i == args.max:
            break
        (x, label) = dataset[i]
        before_time = time()
        prediction, radius = smoothed_classifier.certify(x, args.N0, args.N, args.alpha, args.batch)
        after_time = time()
        correct = int(prediction == label)
        time_elapsed = str(datetime.timedelta(seconds=(after_time - before_time)))
        print("{}\t{}\t{}\t{:.3}\t{}\t{}".format(
            i, label, prediction, radius, correct, time_elapsed), file=f, flush=True)
    f.close()


def test_cohen_script_runs_unchanged_and_is_sound(tmp_path):
    torch.manual_seed(0)
    model, u, g = _setup()
    distances = [-0.9, -0.5, -0.3, -0.15, 0.1, 0.2, 0.4, 0.7, 1.0, 2.0]
    dataset = [(_image(u, model.t, s, g), 0 if s > 0 else 1) for s in distances]
    out = tmp_path / "sigma_0.25.tsv"
    cohen_certify_script(Smooth, model, dataset, NUM_CLASSES, 0.25, Args, str(out))

    rows = read_results(str(out)).rows
    assert [r.idx for r in rows] == list(range(len(distances)))
    certified = 0
    for row, s in zip(rows, distances):
        if row.predict == Smooth.ABSTAIN:
            assert row.radius == 0.0
            continue
        # g = f for a linear f and symmetric noise: the exact l2 robust radius is |s|.
        assert row.predict == row.label
        assert row.radius <= abs(s) + 1e-3  # "{:.3}" rounds to 3 significant digits
        certified += 1
    assert certified >= 8  # only points very near the boundary may abstain at n = 2000
    # the far point gets close to the largest radius n = 2000 allows: sigma * Phi^-1(alpha^(1/n))
    assert rows[-1].radius > 0.6


def test_certify_types_radius_and_abstain():
    torch.manual_seed(1)
    model, u, g = _setup(1)
    smooth = Smooth(model, NUM_CLASSES, 0.25)
    assert Smooth.ABSTAIN == -1 and smooth.ABSTAIN == -1
    prediction, radius = smooth.certify(_image(u, model.t, 0.5, g), 100, 2000, 0.001, 512)
    assert type(prediction) is int and type(radius) is float
    assert prediction == 0 and 0.2 < radius <= 0.5
    # on the boundary p_A = 1/2: the lower bound is below 1/2 and certify abstains with radius 0.0
    assert smooth.certify(_image(u, model.t, 0.0, g), 100, 1000, 0.001, 512) == (-1, 0.0)


def test_sample_noise_counts():
    torch.manual_seed(2)
    model, u, g = _setup(2)
    smooth = Smooth(model, NUM_CLASSES, 0.5)
    x = _image(u, model.t, 0.1, g)
    for num, batch in ((1037, 100), (5, 1000), (0, 7)):
        counts = smooth._sample_noise(x, num, batch)
        assert isinstance(counts, np.ndarray) and np.issubdtype(counts.dtype, np.integer)
        assert counts.shape == (NUM_CLASSES,) and int(counts.sum()) == num and counts[2] == 0
    assert list(smooth._count_arr(np.array([0, 2, 2, 1, 2]), 4)) == [1, 1, 3, 0]


class Recorder(torch.nn.Module):
    """Remembers the noisy inputs it sees."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, z):
        self.seen.append(z.detach().float().clone())
        return torch.stack([z.flatten(1).sum(1), torch.zeros(len(z))], dim=1)


def test_fresh_noise_per_call_and_manual_seed_reproduces():
    model = Recorder()
    smooth = Smooth(model, 2, 0.25)
    x = torch.zeros(SHAPE)
    torch.manual_seed(3)
    smooth.certify(x, 10, 20, 0.001, 100)  # selection, then estimation
    smooth._sample_noise(x, 20, 100)
    selection, estimation, third = model.seen
    assert not torch.allclose(selection, estimation[:10])
    assert not torch.allclose(estimation, third)
    # torch.manual_seed controls the noise, as with Cohen's torch.randn_like
    model.seen.clear()
    torch.manual_seed(3)
    smooth.certify(x, 10, 20, 0.001, 100)
    assert torch.equal(model.seen[0], selection) and torch.equal(model.seen[1], estimation)
    # a new instance per image does not repeat the noise of the previous instance
    model.seen.clear()
    Smooth(model, 2, 0.25)._sample_noise(x, 20, 100)
    Smooth(model, 2, 0.25)._sample_noise(x, 20, 100)
    assert not torch.allclose(model.seen[0], model.seen[1])


@pytest.mark.parametrize("NA,N,alpha", [(0, 100, 0.001), (1, 100, 0.001), (50, 100, 0.05),
                                        (990, 1000, 0.001), (1000, 1000, 0.001), (99_000, 100_000, 0.001)])
def test_lower_confidence_bound_is_clopper_pearson(NA, N, alpha):
    smooth = Smooth(Recorder(), 2, 0.25)
    expected = 0.0 if NA == 0 else beta.ppf(alpha, NA, N - NA + 1)
    assert smooth._lower_confidence_bound(NA, N, alpha) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    if NA == N:
        assert smooth._lower_confidence_bound(NA, N, alpha) == pytest.approx(alpha ** (1 / N), rel=1e-12)


def test_predict_answers_and_abstains():
    torch.manual_seed(4)
    model, u, g = _setup(4)
    smooth = Smooth(model, NUM_CLASSES, 0.25)
    far0, far1 = _image(u, model.t, 0.6, g), _image(u, model.t, -0.6, g)
    assert smooth.predict(far0, 1000, 0.001, 250) == 0
    assert smooth.predict(far1, 1000, 0.001, 250) == 1
    assert type(smooth.predict(far0, 100, 0.001, 250)) is int
    # exactly on the boundary the top two classes split ~50/50: the binomial test abstains
    assert smooth.predict(_image(u, model.t, 0.0, g), 1000, 0.001, 250) == Smooth.ABSTAIN


def test_batched_input_and_cpu_model():
    torch.manual_seed(5)
    model, u, g = _setup(5)
    smooth = Smooth(model, NUM_CLASSES, 0.25)
    x = _image(u, model.t, 0.8, g)
    prediction, radius = smooth.certify(x[None], 100, 1000, 0.001, 1000)  # [1 x C x H x W]
    assert prediction == 0 and 0 < radius <= 0.8


def test_other_noise_through_the_same_face():
    torch.manual_seed(6)
    model, u, g = _setup(6)
    s = 0.6
    x = _image(u, model.t, s, g)
    smooth = Smooth(model, NUM_CLASSES, 0.25, noise=Laplace(sigma=0.25))
    prediction, radius = smooth.certify(x, 100, 2000, 0.001, 1000)
    # l1 distance to the hyperplane u.z = t is |u.x - t| / ||u||_inf (the default l1 radius of Laplace)
    l1_distance = s / u.abs().max().item()
    assert prediction == 0 and 0 < radius <= l1_distance
    by_name = Smooth(model, NUM_CLASSES, 0.25, noise="laplace")
    assert by_name.noise == Laplace(sigma=0.25) and by_name.sigma == 0.25
    with pytest.raises(ValueError):
        Smooth(model, NUM_CLASSES, 0.5, noise=Laplace(sigma=0.25))
    smooth.sigma = 0.5  # assigning sigma keeps the kind of noise
    assert smooth.noise == Laplace(sigma=0.5)


def test_inputs_on_the_8_bit_grid_are_certified_on_it():
    """input_grid="auto": an image on the grid k / 255 (the originals' data before their
    NormalizeLayer) runs the engine in grid mode, sound in floating point; an image off the grid runs
    in float arithmetic, as the original; uint8 pixels are the grid indices themselves."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    smooth = Smooth(model, 3, 0.25)
    k = torch.randint(0, 256, (3, 2, 2))
    smooth.predict(k / 255.0, 50, 0.01, 50)
    assert smooth._engine_key[-1] == 255 and smooth._engine.sampler.input_grid == 255
    smooth.predict(k / 255.0 + 1e-3, 50, 0.01, 50)
    assert smooth._engine_key[-1] is None
    smooth.predict(k.to(torch.uint8), 50, 0.01, 50)
    assert smooth._engine_key[-1] == 255
    forced = Smooth(model, 3, 0.25, input_grid=None)
    forced.predict(k / 255.0, 50, 0.01, 50)
    assert forced._engine_key[-1] is None
    with pytest.raises(ValueError, match="uint8"):
        forced.predict(k.to(torch.uint8), 50, 0.01, 50)
