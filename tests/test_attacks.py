"""attacks.py: ball projections (l1 by Duchi et al. 2008, l2, l_inf), the soft smoothed loss, PGD."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from fastsmooth.backends import draw_noise
from fastsmooth.attacks import (SmoothAdvPGD, ascent_direction, project, project_l1, project_l2, project_linf,
                                soft_smoothed_loss)
from fastsmooth.noises import Gaussian, Laplace

NORMS = ("l1", "l2", "linf")
_P = {"l1": 1, "l2": 2, "linf": math.inf}
_DUAL = {"l1": math.inf, "l2": 2, "linf": 1}


def _norms(t, norm):
    return t.reshape(t.shape[0], -1).norm(p=_P[norm], dim=1)


def _cases(seed, rows=64, shape=(3, 5, 4), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(rows, *shape, generator=g, dtype=dtype) * torch.rand(rows, 1, 1, 1, generator=g, dtype=dtype) * 3
    v[0] = 0.0                                  # a zero row
    v[1] = 0.7                                  # all magnitudes tied
    v[2, 0, 0, 0] = 5.0                         # one dominant coordinate
    eps = torch.rand(rows, generator=g, dtype=dtype) * 4
    eps[3] = 0.0                                # a zero radius
    eps[4] = 1e6                                # far inside
    return v, eps


# -- projections -----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("seed", range(3))
def test_projection_lands_inside_is_idempotent_and_optimal(norm, seed):
    v, eps = _cases(seed)
    w = project(v, eps, norm)
    assert w.shape == v.shape and w.dtype == v.dtype
    # inside the ball
    assert bool((_norms(w, norm) <= eps * (1 + 1e-12) + 1e-12).all())
    # idempotent
    torch.testing.assert_close(project(w, eps, norm), w, rtol=0, atol=1e-12)
    # points already inside are unchanged
    inside = _norms(v, norm) <= eps
    torch.testing.assert_close(w[inside], v[inside], rtol=0, atol=0)
    # optimal: w is the projection of v onto the convex ball C iff (v - w).(z - w) <= 0 for all z in C;
    # the maximum over C of the linear function z -> (v - w).z is eps * ||v - w||_dual, so the
    # condition reads eps * ||v - w||_dual <= (v - w).w (the KKT conditions of the projection).
    r = (v - w).reshape(v.shape[0], -1)
    lhs = eps * r.norm(p=_DUAL[norm], dim=1)
    rhs = (r * w.reshape(v.shape[0], -1)).sum(dim=1)
    assert bool((lhs <= rhs + 1e-9).all()), (lhs - rhs).max()


def _l1_projection_by_bisection(v: np.ndarray, eps: float) -> np.ndarray:
    """Reference: w = sign(v) max(|v| - theta, 0) with ||w||_1 = eps, theta found by bisection."""
    a = np.abs(v)
    if a.sum() <= eps:
        return v.copy()
    lo, hi = 0.0, a.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.maximum(a - mid, 0).sum() > eps:
            lo = mid
        else:
            hi = mid
    return np.sign(v) * np.maximum(a - hi, 0)


@pytest.mark.parametrize("seed", range(3))
def test_duchi_matches_bisection_reference(seed):
    v, eps = _cases(seed, rows=32, shape=(1, 7, 9))
    w = project_l1(v, eps).reshape(32, -1).numpy()
    flat = v.reshape(32, -1).numpy()
    for i in range(32):
        np.testing.assert_allclose(w[i], _l1_projection_by_bisection(flat[i], float(eps[i])), atol=1e-9)


def test_duchi_matches_scipy_qp():
    from scipy.optimize import minimize

    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        v = torch.randn(1, 6, generator=g, dtype=torch.float64)
        eps = 0.5 * float(v.abs().sum())
        # min ||p - q - v||^2 s.t. p, q >= 0, sum(p + q) <= eps  (w = p - q)
        x0 = np.zeros(12)
        vv = v[0].numpy()
        res = minimize(lambda z: np.sum((z[:6] - z[6:] - vv) ** 2), x0,
                       jac=lambda z: np.concatenate([2 * (z[:6] - z[6:] - vv), -2 * (z[:6] - z[6:] - vv)]),
                       bounds=[(0, None)] * 12, method="SLSQP",
                       constraints=[{"type": "ineq", "fun": lambda z: eps - z.sum(), "jac": lambda z: -np.ones(12)}],
                       options={"ftol": 1e-14, "maxiter": 500})
        assert res.success
        qp = res.x[:6] - res.x[6:]
        np.testing.assert_allclose(project_l1(v, eps)[0].numpy(), qp, atol=1e-6)


def test_projection_details():
    v = torch.tensor([[3.0, -4.0]])
    torch.testing.assert_close(project_l2(v, 1.0), torch.tensor([[0.6, -0.8]]))
    torch.testing.assert_close(project_linf(v, 1.0), torch.tensor([[1.0, -1.0]]))
    torch.testing.assert_close(project_l1(v, 1.0), torch.tensor([[0.0, -1.0]]))
    torch.testing.assert_close(project_l1(torch.tensor([[2.0, -2.0, 0.5]]), 1.0), torch.tensor([[0.5, -0.5, 0.0]]))
    torch.testing.assert_close(project_l1(v, 0.0), torch.zeros_like(v))
    # float32 lands inside up to rounding
    x = torch.randn(16, 1, 28, 28)
    assert bool((_norms(project_l1(x, 2.0), "l1") <= 2.0 * (1 + 1e-5)).all())
    with pytest.raises(ValueError):
        project(v, 1.0, "l3")
    with pytest.raises(ValueError):
        project_l2(v, -1.0)
    with pytest.raises(ValueError):
        project_l1(v, torch.ones(3))


# -- objective and steps -------------------------------------------------------------------------


def _model(seed=0, channels=1, size=8, classes=5):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * size * size, classes)).double().eval()


def test_soft_smoothed_loss_is_cross_entropy_of_mean_softmax():
    model = _model()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=g)
    noise = torch.randn(6, 3, 1, 8, 8, generator=g, dtype=torch.float64) * 0.5
    probs = torch.stack([torch.softmax(model(x + noise[:, j]), dim=1) for j in range(3)], 1).mean(1)
    expected = -torch.log(probs[torch.arange(6), y])
    torch.testing.assert_close(soft_smoothed_loss(model, x, y, noise, reduction="none"), expected)
    torch.testing.assert_close(soft_smoothed_loss(model, x, y, noise), expected.mean())
    # m = 1: plain cross-entropy on x + eps
    one = noise[:, :1]
    torch.testing.assert_close(soft_smoothed_loss(model, x, y, one, reduction="none"),
                               nn.functional.cross_entropy(model(x + one[:, 0]), y, reduction="none"))
    with pytest.raises(ValueError):
        soft_smoothed_loss(model, x, y, noise[0])


def test_ascent_directions():
    g = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    l2 = ascent_direction(g, "l2")
    torch.testing.assert_close(_norms(l2, "l2"), torch.ones(4))
    assert torch.equal(ascent_direction(g, "linf"), torch.sign(g))
    l1 = ascent_direction(g, "l1", l1_topk=0.125)         # k = 8 of 64
    flat, gf = l1.reshape(4, -1), g.reshape(4, -1)
    torch.testing.assert_close(_norms(l1, "l1"), torch.ones(4))
    assert bool(((flat != 0).sum(1) == 8).all())
    for i in range(4):
        chosen = set(torch.nonzero(flat[i]).flatten().tolist())
        assert chosen == set(gf[i].abs().topk(8).indices.tolist())
        assert bool((torch.sign(flat[i][flat[i] != 0]) == torch.sign(gf[i][flat[i] != 0])).all())
    # coordinates at the box boundary whose ascent direction leaves the box do not compete
    x_adv = torch.full_like(g, 0.5)
    x_adv.reshape(4, -1)[:, :] = torch.where(gf > 0, torch.ones_like(gf), torch.zeros_like(gf))
    assert torch.equal(ascent_direction(g, "l1", x_adv=x_adv), torch.zeros_like(g))
    # zero gradient: no step
    z = torch.zeros(2, 1, 4, 4)
    for norm in NORMS:
        assert torch.equal(ascent_direction(z, norm), z)


# -- the attack ------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm,epsilon", [("l2", 0.5), ("l1", 2.0), ("linf", 0.05)])
def test_attack_raises_the_soft_smoothed_loss(norm, epsilon):
    model = _model(3)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(32, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (32,), generator=gen)
    noise = draw_noise((Gaussian if norm == "l2" else Laplace)(sigma=0.25), 32 * 4, (1, 8, 8), seed=3, image_index=0)
    noise = noise.reshape(32, 4, 1, 8, 8).double()
    held = noise.clone()
    attack = SmoothAdvPGD(norm, epsilon, num_steps=3)
    x_adv = attack(model, x, y, noise)
    assert torch.equal(noise, held)  # the draws are not touched
    delta = x_adv - x
    assert bool((_norms(delta, norm) <= epsilon * (1 + 1e-9)).all())
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    before = soft_smoothed_loss(model, x, y, noise, reduction="none")
    after = soft_smoothed_loss(model, x_adv, y, noise, reduction="none")
    assert float(after.mean().detach()) > float(before.mean().detach()) + 1e-3
    assert float((after >= before - 1e-12).double().mean()) >= 0.9
    # deterministic for fixed noise (nothing random inside), and epsilon = 0 leaves x alone
    torch.testing.assert_close(attack(model, x, y, noise), x_adv, rtol=0, atol=0)
    assert torch.equal(SmoothAdvPGD(norm, 0.0)(model, x, y, noise), x)


def test_attack_leaves_the_model_alone_and_takes_per_image_epsilons():
    model = _model(4).float().train()
    x = torch.rand(5, 1, 8, 8)
    y = torch.zeros(5, dtype=torch.int64)
    noise = torch.randn(5, 2, 1, 8, 8) * 0.25
    eps = torch.tensor([0.0, 0.1, 0.2, 0.4, 0.8])
    delta = SmoothAdvPGD("l2", eps, num_steps=2).perturb(model, x, y, noise)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert bool((_norms(delta, "l2") <= eps * (1 + 1e-5) + 1e-7).all())
    assert float(_norms(delta, "l2")[0]) == 0.0
    with pytest.raises(ValueError):
        SmoothAdvPGD("l0")
    with pytest.raises(ValueError):
        SmoothAdvPGD("l2", 0.5, num_steps=0)
