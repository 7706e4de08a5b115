"""Drop-in face of rs4a's ``src/noises`` and ``src/smooth`` (Yang et al., "Randomized Smoothing of
All Shapes and Sizes", ICML 2020; tonyduan/rs4a), on fastsmooth's engine.

Existing code switches with one changed import:

    # from src.noises import *
    # from src.smooth import *
    from fastsmooth.compat.rs4a import *

    noise = Laplace(dim=3 * 32 * 32, sigma=0.5, device="cuda")
    preds = smooth_predict_hard(model, x, noise, sample_size=64, noise_batch_size=512)
    prob_lb = certify_prob_lb(model, x, preds.probs.argmax(dim=1), 0.001, noise, 100_000)
    radius = noise.certify(prob_lb, adv=np.inf)

The face is rs4a's: ``Noise(dim, sigma=None, lambd=None, device='cpu')`` with exactly one of sigma
(the per-coordinate RMS, as in fastsmooth) and lambd (the scale in the density); ``ExpInf(dim,
sigma, lambd, k=1, j=0, device)``; the attributes ``dim``, ``sigma``, ``lambd``, ``device``;
``get_sigma``, ``get_lambd``, ``sample(x)`` (x + noise, one copy per row of x),
``certify(prob_lb, adv)`` with adv 1, 2 or np.inf on a tensor of lower bounds and
``certify_l1`` / ``certify_l2`` / ``certify_linf``; ``parse_noise_from_args``; and the four
functions of src/smooth. rs4a's other noises (Clean, Pareto, UniformBall, Exp1, Exp2, Expp, PowInf,
Pow2, and the bases CubicalDist, SphericalDist) raise NotImplementedError. What differs:

* Radii: rs4a's wherever rs4a's are proven, and the proven ones where they are not. Laplace in
  l_inf (rs4a's default ``mode="approx"``, lambda Phi^-1(p)/sqrt(d), is a CLT estimate that exceeds
  the true radius at small d) and ExpInf(k != 1) in l_inf (tables of scipy quadratures, estimates)
  return Yang et al.'s differential method as a guaranteed lower bound (fastsmooth.differential).
  Every radius is the largest over the noise's direct certificates, each moved to the norm asked
  for by the sound conversion (rs4a takes only the direct one when there is one: the same numbers,
  except ExpInf's l1 at tiny d, where its l_inf certificate is larger). p_lower <= 1/2 gives radius
  0 (rs4a returns a negative number). Radii come back in the dtype of prob_lb, rounded toward 0.
* The smoothed predictions run on fastsmooth's engine (``fastsmooth.sampler.Sampler``): the copies
  of all images of x share full batches of ``len(x) * noise_batch_size`` rows (rs4a's batch size),
  a batch on the 8-bit grid k / 255 is sampled in grid mode (the noisy inputs formed from integers,
  sound in floating point, as in compat.cohen; DESIGN §5), any other in float32 arithmetic (x + eps,
  rs4a's practice, which is not); counts stay on the device until the end; Triton kernels on
  CUDA, and ``precision="auto"`` runs the model in bf16 on GPUs (``precision="fp32"`` keeps rs4a's
  fp32 model). The model runs in eval mode during the call (its mode is restored afterwards).
  Every call draws a fresh 63-bit noise seed from torch's global CPU generator (so
  ``torch.manual_seed`` makes a run reproducible, and certify_prob_lb's votes are independent of
  the smooth_predict_hard call that chose top_cats, as in rs4a).
* ``certify_prob_lb`` keeps rs4a's semantics, the lower end of a two-sided Clopper-Pearson interval
  at level alpha, i.e. a one-sided bound at alpha/2 (statsmodels' proportion_confint(..., alpha,
  method="beta"), here by SciPy: no statsmodels), minus the sampler's total-variation distance tau
  (DESIGN §5), as float32 rounded down.
* ``direct_train_log_lik`` needs gradients, so it runs the model directly (not through the engine)
  on ``noise.sample``'s copies, as rs4a does.
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical

from ..backends import draw_noise
from ..checks import check_alpha, check_dim, check_positive_int, positive_float
from ..grid import on_grid
from . import call_seed
from ..noises import Noise as _FastNoise
from ..noises import make_noise
from ..sampler import Job, Sampler, model_device
from ..seeding import DOMAIN_TRAIN
from ..stats import clopper_pearson_lower

__all__ = [
    "Noise", "Gaussian", "Laplace", "Uniform", "ExpInf",
    "Clean", "Pareto", "UniformBall", "Exp1", "Exp2", "Expp", "PowInf", "Pow2", "CubicalDist", "SphericalDist",
    "parse_noise_from_args",
    "smooth_predict_hard", "smooth_predict_soft", "certify_prob_lb", "direct_train_log_lik",
]

_ADVERSARIES = {1: "l1", 2: "l2", math.inf: "linf"}


def _noisy(noise: _FastNoise, x: torch.Tensor) -> torch.Tensor:
    """x + eps, one independent copy of the noise per row of x: the one place this module draws noise.

    The stream's copies 0 .. len(x) - 1 of image 0 under a fresh 63-bit seed per call, drawn from
    torch's global CPU generator (rs4a draws from torch's global generators: torch.manual_seed
    makes a run reproducible either way), in float32 on x's device."""
    # Float arithmetic: these copies train a model (rs4a's sample); certification (below) goes through
    # the engine, in grid mode for inputs on the 8-bit grid.
    seed = call_seed()
    eps = draw_noise(noise, x.shape[0], x.shape[1:], seed=seed, image_index=0, domain=DOMAIN_TRAIN, device=x.device)
    return x + eps


# ----------------------------------------------------------------------------------------------
# src/noises
# ----------------------------------------------------------------------------------------------
class Noise:
    """rs4a's Noise face over a fastsmooth noise of the same scale lambd.

    ``sigma`` is sqrt(E ||noise||_2^2 / dim), ``lambd`` the scale in the density (rs4a's and
    fastsmooth's conventions agree); exactly one of them is given, the other follows from ``dim``.
    """

    name = ""          # fastsmooth's noise name
    __adv__ = []       # the norms (1, 2, np.inf) that rs4a certifies directly for this noise

    def __init__(self, dim, sigma=None, lambd=None, device="cpu"):
        self.dim = check_dim(dim)
        self.device = device
        if (sigma is None) == (lambd is None):
            raise ValueError("Please give exactly one of sigma or lambd")
        if sigma is not None:
            self.sigma = positive_float(sigma, f"{type(self).__name__}: sigma")
            self.lambd = self.get_lambd(self.sigma)
        else:
            self.lambd = positive_float(lambd, f"{type(self).__name__}: lambd")
            self.sigma = self.get_sigma(self.lambd)

    # -- parameters ---------------------------------------------------------------------------
    def _params(self) -> dict:
        return {}

    @property
    def fastsmooth_noise(self) -> _FastNoise:
        """The fastsmooth noise with this scale (built from the current ``lambd``)."""
        return make_noise(self.name, scale=self.lambd, **self._params())

    def _sigma(self) -> float:
        """sigma at lambd = 1 for inputs of ``dim`` elements."""
        return make_noise(self.name, scale=1.0, **self._params()).sigma_for(self.dim)

    def get_sigma(self, lambd=None) -> float:
        return (self.lambd if lambd is None else lambd) * self._sigma()

    def get_lambd(self, sigma=None) -> float:
        return (self.sigma if sigma is None else sigma) / self._sigma()

    def __str__(self) -> str:
        extra = "".join(f"{k}={v}, " for k, v in self._params().items())
        return f"{type(self).__name__}(dim={self.dim}, {extra}lambd={self.lambd}, sigma={self.sigma})"

    __repr__ = __str__

    def plotstr(self) -> str:
        return type(self).__name__

    # -- sampling -------------------------------------------------------------------------------
    def sample(self, x: torch.Tensor) -> torch.Tensor:
        """x + noise, one independent copy per row of x (rows of ``dim`` elements: (B, dim) or (B, C, H, W))."""
        x = torch.as_tensor(x)
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.dim:
            raise ValueError(f"x must hold rows of dim={self.dim} elements, got shape {tuple(x.shape)}")
        return _noisy(self.fastsmooth_noise, x)

    # -- certificates ---------------------------------------------------------------------------
    def certify(self, prob_lb, adv) -> torch.Tensor:
        """Certified radii in l_adv (adv 1, 2 or np.inf) for a tensor of lower bounds on p_A.

        The largest over the noise's direct certificates (proven ones only, see the module
        docstring), moved to l_adv by the sound conversion; 0 where prob_lb <= 1/2. Same shape and
        device as prob_lb, its floating dtype (float32 for integers), rounded toward 0.
        """
        norm = _ADVERSARIES.get(float(adv)) if isinstance(adv, (int, float, np.number)) else None
        if norm is None:
            raise ValueError(f"adv must be 1, 2 or np.inf, got {adv!r}")
        lower = torch.as_tensor(prob_lb)
        dtype = lower.dtype if lower.is_floating_point() else torch.float32
        noise = self.fastsmooth_noise
        radii = [noise.radius(float(p), norm, self.dim) for p in lower.detach().cpu().double().reshape(-1).tolist()]
        return _round_toward_zero(torch.tensor(radii, dtype=torch.float64), dtype).reshape(lower.shape).to(lower.device)

    def certify_l1(self, prob_lb) -> torch.Tensor:
        return self.certify(prob_lb, adv=1)

    def certify_l2(self, prob_lb) -> torch.Tensor:
        return self.certify(prob_lb, adv=2)

    def certify_linf(self, prob_lb) -> torch.Tensor:
        return self.certify(prob_lb, adv=np.inf)


def _round_toward_zero(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 values in ``dtype``, each rounded down in magnitude, never up: a certificate stays one."""
    out = values.to(dtype)
    up = out.double().abs() > values.abs()
    if up.any():
        out[up] = torch.nextafter(out[up], torch.zeros_like(out[up]))
    return out


class Gaussian(Noise):
    """Isotropic Gaussian noise (sigma = lambd); certifies l2 directly (Cohen et al. 2019)."""

    name, __adv__ = "gaussian", [2]


class Laplace(Noise):
    """Isotropic Laplace noise exp(-||x||_1 / lambd) (sigma = sqrt(2) lambd); certifies l1 and l_inf."""

    name, __adv__ = "laplace", [1, np.inf]

    def certify_linf(self, prob_lb, mode="integrate", **table_options) -> torch.Tensor:
        """l_inf radii by Yang et al.'s differential method, evaluated exactly (a proven bound)
        whatever ``mode``: rs4a's default "approx" is an estimate, never returned here; its table
        options (inc, grid_type, upper, save) are accepted and have nothing to tune."""
        if mode not in ("approx", "integrate"):
            raise ValueError(f'Unrecognized mode "{mode}"')
        return self.certify(prob_lb, adv=np.inf)


class Uniform(Noise):
    """Uniform noise on [-lambd, lambd]^dim (sigma = lambd / sqrt(3)); certifies l1 and l_inf."""

    name, __adv__ = "uniform", [1, np.inf]


class ExpInf(Noise):
    """Noise exp(-(||x||_inf / lambd)^k) (rs4a's ExpInf with j = 0); certifies l1 and l_inf."""

    name, __adv__ = "expinf", [1, np.inf]

    def __init__(self, dim, sigma=None, lambd=None, k=1, j=0, device="cpu"):
        if j != 0:
            raise NotImplementedError(f"ExpInf with j={j}: only j = 0, exp(-(||x||_inf / lambd)^k), is implemented")
        self.k = positive_float(k, "ExpInf: k")
        self.j = 0
        super().__init__(dim, sigma, lambd, device)

    def _params(self) -> dict:
        return {"k": self.k}

    def plotstr(self) -> str:
        return f"ExpInf,k={self.k},j={self.j}"


def _not_implemented(name: str, what: str) -> type:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError(
            f"rs4a's {name} ({what}) is not part of fastsmooth.compat.rs4a, which has Gaussian, Laplace, "
            "Uniform and ExpInf(k, j=0); keep rs4a's src.noises for it")

    return type(name, (Noise,), {"__init__": __init__, "__doc__": f"rs4a's {name}: not implemented here."})


Clean = _not_implemented("Clean", "no noise")
Pareto = _not_implemented("Pareto", "a power law per coordinate")
UniformBall = _not_implemented("UniformBall", "uniform on the l2 ball")
Exp1 = _not_implemented("Exp1", "exp(-||x||_1^k)")
Exp2 = _not_implemented("Exp2", "||x||_2^-j exp(-||x||_2^k)")
Expp = _not_implemented("Expp", "exp(-||x||_p^p)")
PowInf = _not_implemented("PowInf", "(1 + ||x||_inf)^-a")
Pow2 = _not_implemented("Pow2", "(1 + ||x||_2^k)^-a")
CubicalDist = _not_implemented("CubicalDist", "a base class")
SphericalDist = _not_implemented("SphericalDist", "a base class")

_BY_NAME = {cls.__name__: cls for cls in (Gaussian, Laplace, Uniform, ExpInf, Clean, Pareto, UniformBall, Exp1,
                                          Exp2, Expp, PowInf, Pow2, CubicalDist, SphericalDist)}


def parse_noise_from_args(args, device, dim) -> Noise:
    """rs4a's: the noise named ``args.noise``, built from args.sigma / lambd / k / j / a (None ones left out)."""
    if args.noise not in _BY_NAME:
        raise ValueError(f"unknown noise {args.noise!r}; expected one of {', '.join(_BY_NAME)}")
    names = ("sigma", "lambd", "k", "j", "a")
    kwargs = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return _BY_NAME[args.noise](device=device, dim=dim, **kwargs)


# ----------------------------------------------------------------------------------------------
# src/smooth
# ----------------------------------------------------------------------------------------------
_engine_slot: dict = {}  # one engine, for the last (model, noise, settings): a script uses one model


def _engine(model: nn.Module, noise: _FastNoise, x: torch.Tensor, backend: str, precision: str) -> Sampler:
    """fastsmooth's Sampler for (model, noise, settings), rebuilt when any of them changed. The
    number of classes is read from one forward of the first image (rs4a reads it from the logits).
    A batch on the 8-bit grid k / 255 (rs4a's data sets before normalization) is sampled in grid
    mode, sound in floating point (fastsmooth.grid); other inputs in float32 arithmetic, as rs4a."""
    device = model_device(model)
    grid = 255 if on_grid(x, 255) else None
    key = (id(model), str(device), noise, backend, precision, grid)
    cached = _engine_slot.get("key")
    if cached == key and _engine_slot["model"]() is model:
        return _engine_slot["sampler"]
    with torch.inference_mode():
        num_classes = int(model(x[:1].to(device)).shape[-1])
    sampler = Sampler(model, num_classes, noise, backend=backend, precision=precision, device=device,
                      input_grid=grid)
    _engine_slot.clear()
    _engine_slot.update(key=key, model=weakref.ref(model), sampler=sampler)
    return sampler


def _check_batch(x, noise) -> torch.Tensor:
    if not isinstance(noise, Noise) or not noise.name:
        raise TypeError(f"noise must be one of fastsmooth.compat.rs4a's noises (Gaussian, Laplace, Uniform, "
                        f"ExpInf), got {noise!r}")
    x = torch.as_tensor(x)
    if x.dim() < 2 or math.prod(x.shape[1:]) != noise.dim:
        raise ValueError(f"x must be a batch of inputs of dim={noise.dim} elements, got shape {tuple(x.shape)}")
    return x


def _totals(model, x, noise, sample_size, noise_batch_size, soft, backend, precision):
    """(per-image totals (B, K) on the CPU over ``sample_size`` fresh copies of each image of x, the sampler)."""
    x = _check_batch(x, noise)
    n = check_positive_int("sample_size", sample_size)
    per_image = check_positive_int("noise_batch_size", noise_batch_size)
    was_training = model.training
    try:
        model.eval()
        sampler = _engine(model, noise.fastsmooth_noise, x, backend, precision)
        # A fresh seed per call: the noise of copy c of image i is a pure function of (seed, i, c).
        sampler.seed = call_seed()
        jobs = [Job(image, i, 0, n) for i, image in enumerate(x.detach())]
        return sampler.run(jobs, len(jobs) * min(n, per_image), soft=soft), sampler
    finally:
        model.train(was_training)


def smooth_predict_hard(model, x, noise, sample_size=64, noise_batch_size=512, *, backend="auto",
                        precision="auto") -> Categorical:
    """Hard predictions of the smoothed classifier: the vote frequencies of ``sample_size`` noisy
    copies of each image of x, as a Categorical (on x's device). An estimate, no bound."""
    counts, _ = _totals(model, x, noise, sample_size, noise_batch_size, False, backend, precision)
    return Categorical(probs=counts.to(device=torch.as_tensor(x).device, dtype=torch.float32))


def smooth_predict_soft(model, x, noise, sample_size=64, noise_batch_size=512, *, backend="auto",
                        precision="auto") -> Categorical:
    """Soft predictions: the mean softmax over ``sample_size`` noisy copies of each image of x, as a
    Categorical. (rs4a sums per-batch means, which weighs a short last batch like a full one; this
    is the plain mean, the same when sample_size is a multiple of noise_batch_size.)"""
    sums, _ = _totals(model, x, noise, sample_size, noise_batch_size, True, backend, precision)
    return Categorical(probs=(sums / int(sample_size)).to(device=torch.as_tensor(x).device, dtype=torch.float32))


def certify_prob_lb(model, x, top_cats, alpha, noise, sample_size=10**5, noise_batch_size=512, *,
                    backend="auto", precision="auto") -> torch.Tensor:
    """Lower confidence bounds (rho) on the probability of ``top_cats`` under noise, one per image.

    rs4a's semantics: the lower end of the two-sided (1 - alpha) Clopper-Pearson interval, i.e. a
    one-sided bound at level alpha/2, P(rho <= p_A) >= 1 - alpha/2, on ``sample_size`` fresh votes
    (independent of those that chose top_cats). The sampler's tau (its total-variation distance
    from the ideal noise, DESIGN §5) is subtracted. A float32 CPU tensor of shape (len(x),),
    rounded down.
    """
    alpha = check_alpha(alpha)
    counts, sampler = _totals(model, x, noise, sample_size, noise_batch_size, False, backend, precision)
    cats = torch.as_tensor(top_cats).reshape(-1).cpu().tolist()
    if len(cats) != counts.shape[0] or not all(0 <= int(c) < counts.shape[1] for c in cats):
        raise ValueError(f"top_cats must hold one class in [0, {counts.shape[1]}) per image of x, got {top_cats!r}")
    tau = sampler.tv_bound(noise.dim)
    n = int(sample_size)
    lower = [max(0.0, clopper_pearson_lower(int(counts[i, int(c)]), n, alpha / 2) - tau) for i, c in enumerate(cats)]
    return _round_toward_zero(torch.tensor(lower, dtype=torch.float64), torch.float32)


def direct_train_log_lik(model, x, y, noise, sample_size=16) -> torch.Tensor:
    """log((1/S) sum_s softmax(f(x + eps_s))[y]) per image, differentiable (rs4a's direct training
    objective, by logsumexp for stability); the copies come from ``noise.sample``."""
    x = _check_batch(x, noise)
    s = check_positive_int("sample_size", sample_size)
    samples = x.unsqueeze(1).expand(torch.Size([x.shape[0], s]) + x.shape[1:])
    samples = noise.sample(samples.reshape(torch.Size([-1]) + x.shape[1:]))
    thetas = model.forward(samples).view(x.shape[0], s, -1)
    log_probs = thetas[torch.arange(x.shape[0]), :, y] - torch.logsumexp(thetas, dim=2)
    return torch.logsumexp(log_probs, dim=1) - math.log(s)
