"""PGD on the soft smoothed classifier (SmoothAdv, Salman et al. 2019) in l1, l2 and l_inf.

The soft smoothed classifier is G(x) = E_eps[softmax f(x + eps)] (DESIGN §1). SmoothAdv attacks it
with m fixed noise draws per image: for one perturbation delta shared by an image's m draws,

    loss(delta) = -log( (1/m) sum_j softmax(f(x + delta + eps_j))_y )        (Salman et al., eq. (S))

and projected gradient ascent on delta, the draws eps_1..eps_m held fixed across the attack's steps
(the attack optimizes one Monte Carlo objective, not a new one each step). One step:

    l2     delta += a * g / ||g||_2                                            (Salman et al.)
    l_inf  delta += a * sign(g)
    l1     delta += a * sign(g) * 1[top-k |g|] / k   the l1 steepest-ascent direction (a vertex of the
           l1 ball, all the mass on the largest |g_i|) spread over the k largest coordinates, a
           "sparse l1 descent" step (Tramer & Boneh 2019: k = 1% of the coordinates; rs4a: 1/16); only
           coordinates that can still move in their ascent direction (x + delta not already at 0 or 1)
           compete for the top k
    then   delta <- clamp(x + delta, 0, 1) - x, then delta <- projection onto the eps-ball.

Order of the two projections: the three ball projections (l2 scaling, l_inf clamping, l1 soft
thresholding) shrink every coordinate towards 0 without changing its sign, so a delta with x + delta
in [0, 1] keeps that property after the ball projection: the result lies in both sets.

The step size a defaults to 2 * epsilon / num_steps (Salman et al.; rs4a). The projection onto the l1
ball is Duchi, Shalev-Shwartz, Singer & Chandra (ICML 2008), Figure 1: sort |v| decreasingly, find
rho = max{j : u_j - (sum_{i<=j} u_i - eps) / j > 0}, theta = (sum_{i<=rho} u_i - eps) / rho, and
soft-threshold by theta; batched here over rows, O(d log d) per row.

Pure functions (``project_*``, ``soft_smoothed_loss``, ``ascent_direction``) and one small class
(``SmoothAdvPGD``). Everything works on batches of images (B, *shape) with per-image epsilons.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .checks import NORMS, check_norm

__all__ = [
    "ATTACK_NORMS",
    "DEFAULT_L1_TOPK",
    "project_l1",
    "project_l2",
    "project_linf",
    "project",
    "soft_smoothed_loss",
    "ascent_direction",
    "SmoothAdvPGD",
]

ATTACK_NORMS = NORMS  # every norm a certificate is stated in
# The l1 step's share of coordinates: Tramer & Boneh's SLIDE keeps those above the 99th percentile of
# |g| (1%); rs4a keeps the top 1/16. Measured on the embedded MNIST (Laplace sigma 0.5, noise-trained
# cnn, 200 test images, m = 16): with epsilon 8 the soft smoothed accuracy fell to 0.755 / 0.695 under
# 2 / 10 steps with 1%, and only to 0.895 with 1/16, which spreads each step too thin.
DEFAULT_L1_TOPK = 0.01

Epsilon = Union[float, torch.Tensor]


def _eps_column(epsilon: Epsilon, rows: int, like: torch.Tensor) -> torch.Tensor:
    """epsilon as a (rows, 1) tensor of like's dtype and device (a scalar or one value per row)."""
    eps = torch.as_tensor(epsilon, dtype=like.dtype, device=like.device)
    if eps.ndim == 0:
        eps = eps.expand(rows)
    eps = eps.reshape(-1)
    if eps.numel() != rows:
        raise ValueError(f"epsilon must be a scalar or have one value per image ({rows}), got {eps.numel()}")
    if bool((eps < 0).any()) or not bool(torch.isfinite(eps).all()):
        raise ValueError("epsilon must be finite and >= 0")
    return eps[:, None]


# ---------------------------------------------------------------------------------------------
# Projections onto norm balls (per row of a batch: v has shape (B, *shape))


def project_l2(v: torch.Tensor, epsilon: Epsilon) -> torch.Tensor:
    """Euclidean projection of every row of v onto {||w||_2 <= epsilon}: rows outside are rescaled."""
    return _project_l2(v, _eps_column(epsilon, v.shape[0], v))


def project_linf(v: torch.Tensor, epsilon: Epsilon) -> torch.Tensor:
    """Euclidean projection of every row of v onto {||w||_inf <= epsilon}: coordinate-wise clamping."""
    return _project_linf(v, _eps_column(epsilon, v.shape[0], v))


def project_l1(v: torch.Tensor, epsilon: Epsilon) -> torch.Tensor:
    """Euclidean projection of every row of v onto {||w||_1 <= epsilon} (Duchi et al. 2008, Fig. 1).

    Rows already inside are returned unchanged. Otherwise w = sign(v) * max(|v| - theta, 0) with the
    threshold theta > 0 for which ||w||_1 = epsilon, found by one sort: with u = |v| sorted in
    decreasing order and c_j = u_1 + ... + u_j, rho = max{j : u_j > (c_j - eps) / j} and
    theta = (c_rho - eps) / rho. epsilon = 0 gives 0.
    """
    return _project_l1(v, _eps_column(epsilon, v.shape[0], v))


# The projections proper, for eps an already checked (B, 1) column of v's dtype and device: the
# attack checks it once, not at every step (the check reads the device).
def _project_l2(v: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    flat = v.reshape(v.shape[0], -1)
    norms = flat.norm(p=2, dim=1, keepdim=True)
    factor = torch.where(norms > eps, eps / norms.clamp_min(torch.finfo(flat.dtype).tiny), torch.ones_like(norms))
    return (flat * factor).reshape(v.shape)


def _project_linf(v: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    flat = v.reshape(v.shape[0], -1)
    return torch.maximum(torch.minimum(flat, eps), -eps).reshape(v.shape)


def _project_l1(v: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    flat = v.reshape(v.shape[0], -1)
    d = flat.shape[1]
    if d == 0:
        return v.clone()
    mag = flat.abs()
    u, _ = torch.sort(mag, dim=1, descending=True)
    css = torch.cumsum(u, dim=1)
    j = torch.arange(1, d + 1, dtype=flat.dtype, device=flat.device)
    # u_j - (c_j - eps)/j > 0 holds for j = 1..rho and fails after (Duchi et al., Lemma 2): count it.
    condition = u * j > css - eps
    rho = condition.sum(dim=1, keepdim=True).clamp_min(1)
    theta = (css.gather(1, rho - 1) - eps) / rho.to(flat.dtype)
    projected = torch.sign(flat) * (mag - theta.clamp_min(0)).clamp_min(0)
    inside = mag.sum(dim=1, keepdim=True) <= eps
    return torch.where(inside, flat, projected).reshape(v.shape)


def project(v: torch.Tensor, epsilon: Epsilon, norm: str) -> torch.Tensor:
    """Projection of every row of v onto the ``norm`` ball of radius epsilon."""
    return _PROJECTIONS[check_norm(norm, ATTACK_NORMS, "attack norm")](v, _eps_column(epsilon, v.shape[0], v))


_PROJECTIONS = {"l1": _project_l1, "l2": _project_l2, "linf": _project_linf}


# ---------------------------------------------------------------------------------------------
# The objective and the ascent direction


def soft_smoothed_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor,
                       reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the soft smoothed classifier estimated with the given noise draws.

    x: (B, *shape) the (perturbed) images; y: (B,) labels; noise: (B, m, *shape) float32 draws, m per
    image. Returns -log((1/m) sum_j softmax(f(x_b + noise_bj))_{y_b}), reduced over b ("mean", "sum",
    "none"). Computed as -(logsumexp_j log_softmax - log m), exact where Salman et al. clamp the mean
    softmax at 1e-20.
    """
    if noise.ndim != x.ndim + 1 or noise.shape[0] != x.shape[0] or noise.shape[2:] != x.shape[1:]:
        raise ValueError(f"noise must have shape (B, m, *x.shape[1:]) = ({x.shape[0]}, m, "
                         f"{', '.join(map(str, x.shape[1:]))}), got {tuple(noise.shape)}")
    b, m = noise.shape[:2]
    logits = model((x.unsqueeze(1) + noise).reshape(b * m, *x.shape[1:]))
    log_probs = F.log_softmax(widen(logits), dim=1).reshape(b, m, -1)
    log_mean = torch.logsumexp(log_probs, dim=1) - math.log(m)
    return F.nll_loss(log_mean, y, reduction=reduction)


def widen(t: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (autocast) to float32 for the softmax; float32/float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def ascent_direction(grad: torch.Tensor, norm: str, *, x_adv: Optional[torch.Tensor] = None,
                     l1_topk: float = DEFAULT_L1_TOPK, clip: Tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """A unit-norm ascent direction per row: l2 g/||g||_2; l_inf sign(g); l1 sign(g) on the top-k |g|
    coordinates, divided by k (l1 norm 1). Rows with a zero gradient get a zero direction.

    l1 only: x_adv (the current x + delta), when given, excludes coordinates that sit on the box
    boundary and whose ascent direction points out of it (they could not move); l1_topk is k as a
    fraction of the coordinates (at least 1).
    """
    norm = check_norm(norm, ATTACK_NORMS, "attack norm")
    flat = grad.reshape(grad.shape[0], -1)
    if norm == "l2":
        norms = flat.norm(p=2, dim=1, keepdim=True)
        out = torch.where(norms > 0, flat / norms.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
        return out.reshape(grad.shape)
    if norm == "linf":
        return torch.sign(flat).reshape(grad.shape)
    if not 0.0 < l1_topk <= 1.0:
        raise ValueError(f"l1_topk must lie in (0, 1], got {l1_topk}")
    score = flat.abs()
    if x_adv is not None:
        xa = x_adv.reshape(flat.shape)
        stuck = ((xa <= clip[0]) & (flat < 0)) | ((xa >= clip[1]) & (flat > 0))
        score = score.masked_fill(stuck, 0.0)
    d = flat.shape[1]
    k = max(1, min(d, int(round(l1_topk * d))))
    top, idx = torch.topk(score, k, dim=1)
    direction = torch.zeros_like(flat)
    direction.scatter_(1, idx, torch.sign(flat.gather(1, idx)) * (top > 0))
    count = direction.abs().sum(dim=1, keepdim=True)
    direction = direction / count.clamp_min(1.0)
    return direction.reshape(grad.shape)


# ---------------------------------------------------------------------------------------------
# The attack


class SmoothAdvPGD:
    """PGD against the soft smoothed classifier (SmoothAdv's attack), in l1, l2 or l_inf.

    attack = SmoothAdvPGD("l2", epsilon=0.25, num_steps=2)
    x_adv = attack(model, x, y, noise)        # noise: (B, m, *shape), held fixed across the steps

    epsilon: the ball's radius in input units ([0, 1] pixels; Salman et al.'s train_pgd.py divides
    its --epsilon by 256, so their 64 is 0.25 here); a scalar or one value per image.
    step_size: default 2 * epsilon / num_steps. l1_topk: the l1 step's share of coordinates.
    clip: the valid input range that x + delta is kept in.

    The model is put in eval mode for the attack (BatchNorm with running statistics, as Salman et
    al.) and returned to its mode afterwards; the gradient is taken with torch.autograd.grad with
    respect to delta only, so no parameter's .grad is touched.
    """

    def __init__(self, norm: str = "l2", epsilon: Epsilon = 0.25, num_steps: int = 1,
                 step_size: Optional[float] = None, l1_topk: float = DEFAULT_L1_TOPK,
                 clip: Tuple[float, float] = (0.0, 1.0)):
        self.norm = check_norm(norm, ATTACK_NORMS, "attack norm")
        if int(num_steps) != num_steps or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        if step_size is not None and not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size!r}")
        if not 0.0 < l1_topk <= 1.0:
            raise ValueError(f"l1_topk must lie in (0, 1], got {l1_topk}")
        self.epsilon = epsilon
        self.num_steps = int(num_steps)
        self.step_size = step_size
        self.l1_topk = float(l1_topk)
        self.clip = (float(clip[0]), float(clip[1]))

    def __repr__(self) -> str:
        return (f"SmoothAdvPGD(norm={self.norm!r}, epsilon={self.epsilon}, num_steps={self.num_steps}, "
                f"step_size={self.step_size})")

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The adversarial perturbation delta (B, *shape), detached: ||delta_b|| <= epsilon_b in the
        attack's norm and x + delta in ``clip``."""
        x = x.detach()
        eps = _eps_column(self.epsilon, x.shape[0], x if x.is_floating_point() else x.float())
        step = (2.0 * eps / self.num_steps) if self.step_size is None else torch.full_like(eps, self.step_size)
        step = step.reshape(-1, *([1] * (x.ndim - 1)))
        noise = noise.detach()
        delta = torch.zeros_like(x)
        if not bool((eps > 0).any()):
            return delta
        was_training = model.training
        model.eval()
        try:
            for _ in range(self.num_steps):
                delta.requires_grad_(True)
                with torch.enable_grad():
                    loss = soft_smoothed_loss(model, x + delta, y, noise, reduction="sum")
                    (grad,) = torch.autograd.grad(loss, delta)
                delta = delta.detach()
                direction = ascent_direction(grad, self.norm, x_adv=x + delta, l1_topk=self.l1_topk,
                                             clip=self.clip)
                delta = delta + step * direction
                delta = (x + delta).clamp(*self.clip) - x
                delta = _PROJECTIONS[self.norm](delta, eps)  # eps checked above
        finally:
            model.train(was_training)
        return delta.detach()

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x + delta (B, *shape), detached, in ``clip`` (clamped once more against rounding)."""
        return (x.detach() + self.perturb(model, x, y, noise)).clamp(*self.clip)
