"""Drop-in ``core.Smooth`` of Cohen et al. (locuslab/smoothing) and Salman et al.
(Hadisalman/smoothing-adversarial), on fastsmooth's engine.

Existing code switches with one changed import:

    # from core import Smooth
    from fastsmooth.compat.cohen import Smooth

    smoothed_classifier = Smooth(base_classifier, num_classes, sigma)
    prediction, radius = smoothed_classifier.certify(x, args.N0, args.N, args.alpha, args.batch)

The face is the original one: ``Smooth(base_classifier, num_classes, sigma)``, ``Smooth.ABSTAIN``,
``certify(x, n0, n, alpha, batch_size) -> (int, float)`` (``(-1, 0.0)`` when the lower bound is
below 1/2), ``predict(x, n, alpha, batch_size) -> int``, ``_sample_noise(x, num, batch_size)``
(numpy int64 counts), ``_count_arr`` and ``_lower_confidence_bound``, and certify / predict are
written in terms of ``_sample_noise`` and ``_lower_confidence_bound`` as in the original, so
subclasses that override them keep working. What differs:

* the noisy copies go through fastsmooth's engine (``fastsmooth.Smooth``'s sampler: one reusable
  batch buffer, noise drawn and added in float32, Triton kernels on CUDA, the model in bf16 on GPUs
  by default -- ``precision="fp32"`` keeps the original fp32 classifier);
* x may live on any device and the base classifier on any device (CPU included); x is moved to the
  classifier's device. A leading batch dimension of 1 is accepted, as the original's ``repeat`` did;
* SciPy only: no statsmodels, no ``scipy.stats.binom_test`` (gone in SciPy >= 1.12);
* ``noise=`` brings fastsmooth's other noises through the same face: a ``fastsmooth.Noise``
  (``Laplace(sigma=0.5)``, ...) or a name ("laplace", "uniform", "expinf") built with ``sigma``.
  The radius is then in the noise's own norm (l1 for those), or in ``norm=``.

Fresh noise on every call. The original draws its noise from torch's global CUDA generator, so each
call of ``_sample_noise`` sees new noise and ``torch.manual_seed`` makes a run reproducible. Here
every call of ``_sample_noise`` (hence each of certify's two phases, and each predict) draws a fresh
63-bit noise seed from torch's global CPU generator (or from ``generator=``), and fastsmooth's noise
is a pure function of (seed, image, copy). This keeps the guarantee exactly as the original has it:
certify's selection and estimation copies are independent (different seeds), so the selection
never enters the bound (DESIGN §4); and the certificates of different calls (images) are independent
of each other, which the test-set statements built on them need (``fastsmooth analyze --high-prob``
assumes failures independent across images). A per-instance counter over a fixed seed would give
the same independence within one instance but repeat the very same noise whenever code builds a new
``Smooth`` per image or per resumed run; the per-call draw does not depend on instance lifetimes,
and ``torch.manual_seed(s)`` controls it as in the original. Seed collisions between calls are
2^-63-rare. The draw advances torch's global CPU generator once per ``_sample_noise`` call.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from ..checks import check_alpha, check_image, check_norm, check_positive_int
from . import call_seed
from ..grid import check_input_grid, on_grid
from ..noises import Gaussian, Noise, make_noise
from ..sampler import Job, model_device
from ..smooth import Smooth as _EngineSmooth
from ..stats import clopper_pearson_lower, predict_from_counts



class Smooth(object):
    """A smoothed classifier g (Cohen et al.'s ``core.Smooth`` face on fastsmooth's engine)."""

    # to abstain, Smooth returns this int
    ABSTAIN = -1

    def __init__(self, base_classifier: nn.Module, num_classes: int, sigma: Optional[float] = None,
                 noise: Union[Noise, str, None] = None, *, norm: Optional[str] = None,
                 backend: str = "auto", precision: str = "auto",
                 generator: Optional[torch.Generator] = None, input_grid: Union[str, int, None] = "auto"):
        """
        :param base_classifier: maps [batch x channel x height x width] to [batch x num_classes]
        :param num_classes: number of classes
        :param sigma: the noise level (Gaussian standard deviation; for other noises the
            per-coordinate RMS); may be omitted when ``noise`` is a ``fastsmooth.Noise``
        :param noise: None (Gaussian with ``sigma``), a ``fastsmooth.Noise``, or a noise name
        :param norm: norm of the certified radius (default: the noise's own, l2 for the Gaussian)
        :param backend, precision: passed to fastsmooth's engine ("auto" / "torch" / "triton";
            "auto" / "fp32" / "bf16" / "fp16")
        :param generator: a CPU ``torch.Generator`` for the per-call noise seeds (default: torch's
            global generator, which ``torch.manual_seed`` controls)
        :param input_grid: "auto" (the default): inputs on the 8-bit grid k / 255 -- the originals'
            data sets, before their NormalizeLayer -- are certified with noisy inputs formed from
            integers, sound in floating point (fastsmooth.grid); other inputs in float32 arithmetic,
            as the original. An integer G or None forces one or the other.
        """
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self._noise = self._make_noise(sigma, noise)
        self.norm = None if norm is None else check_norm(norm)  # refused before any sampling
        self.backend = backend
        self.precision = precision
        self.generator = generator
        self.input_grid = input_grid if input_grid in ("auto", None) else check_input_grid(input_grid)
        self._engine: Optional[_EngineSmooth] = None
        self._engine_key = None

    # -- noise ------------------------------------------------------------------------------
    @staticmethod
    def _make_noise(sigma, noise) -> Noise:
        if noise is None:
            if sigma is None:
                raise TypeError("Smooth() needs sigma (or noise=)")
            return Gaussian(sigma=float(sigma))
        if isinstance(noise, str):
            if sigma is None:
                raise TypeError(f"noise={noise!r} needs sigma")
            return make_noise(noise, sigma=float(sigma))
        if not isinstance(noise, Noise):
            raise TypeError(f"noise must be a fastsmooth Noise or a noise name, got {noise!r}")
        if sigma is not None and (noise.sigma is None or abs(noise.sigma - float(sigma)) > 1e-12 * float(sigma)):
            raise ValueError(f"sigma={sigma} disagrees with noise={noise!r}; give one of them")
        return noise

    @property
    def noise(self) -> Noise:
        return self._noise

    @property
    def sigma(self) -> Optional[float]:
        """The noise level (None for a noise given by its scale)."""
        return self._noise.sigma

    @sigma.setter
    def sigma(self, value: float) -> None:
        """Changing sigma keeps the kind of noise (as assigning ``smooth.sigma`` did in the original)."""
        spec = {k: v for k, v in self._noise.spec().items() if k not in ("sigma", "scale")}
        self._noise = make_noise(**spec, sigma=float(value))

    # -- engine -----------------------------------------------------------------------------
    def _grid(self, x: torch.Tensor) -> Optional[int]:
        """The input grid x is certified on: "auto" takes 255 when x lies on the 8-bit grid."""
        if x.dtype == torch.uint8:
            if self.input_grid is None:
                raise ValueError("x holds uint8 pixels: they are grid indices, which input_grid=None cannot take")
            return 255 if self.input_grid == "auto" else self.input_grid
        if self.input_grid != "auto":
            return self.input_grid
        return 255 if on_grid(x, 255) else None

    def _smooth(self, grid: Optional[int] = None) -> _EngineSmooth:
        """fastsmooth's Smooth around the base classifier, rebuilt when the classifier has moved to
        another device or the noise / num_classes / settings / input grid changed since the last call."""
        device = model_device(self.base_classifier)
        key = (str(device), self._noise, int(self.num_classes), self.backend, self.precision, grid)
        if self._engine is None or self._engine_key != key:
            self._engine = _EngineSmooth(self.base_classifier, self.num_classes, self._noise,
                                         backend=self.backend, precision=self.precision, device=device,
                                         input_grid=grid)
            self._engine_key = key
        return self._engine

    def _fresh_seed(self) -> int:
        return call_seed(self.generator)

    @staticmethod
    def _as_image(x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.dim() == 4 and x.shape[0] == 1:
            x = x[0]  # [1 x C x H x W]: the original's x.repeat((b, 1, 1, 1)) accepted it too
        return check_image(x, 255 if x.dtype == torch.uint8 else None)

    # -- the original's methods -----------------------------------------------------------------
    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int) -> (int, float):
        """ Monte Carlo algorithm for certifying that g's prediction around x is constant within some
        radius (l2 for the Gaussian; the noise's norm, or ``norm``, otherwise). With probability at
        least 1 - alpha, the class returned by this method will equal g(x), and g's prediction will be
        robust within a ball of radius R around x.

        :param x: the input [channel x height x width]
        :param n0: the number of Monte Carlo samples to use for selection
        :param n: the number of Monte Carlo samples to use for estimation
        :param alpha: the failure probability
        :param batch_size: batch size to use when evaluating the base classifier
        :return: (predicted class, certified radius);
                 in the case of abstention, the class will be ABSTAIN and the radius 0.
        """
        check_positive_int("n0", n0), check_positive_int("n", n), check_positive_int("batch_size", batch_size)
        check_alpha(alpha)
        x = self._as_image(x)
        self.base_classifier.eval()
        # selection: n0 copies guess the top class (ties -> lowest index)
        counts_selection = self._sample_noise(x, n0, batch_size)
        cAHat = int(np.argmax(counts_selection))
        # estimation: n fresh copies, independent of the selection (another seed)
        counts_estimation = self._sample_noise(x, n, batch_size)
        nA = int(counts_estimation[cAHat])
        # a sampler at total-variation distance tau from the ideal noise moves p_A by <= tau (DESIGN §5)
        tau = self._smooth(self._grid(x)).sampler.tv_bound(x.numel())
        pABar = float(self._lower_confidence_bound(nA, n, alpha)) - tau
        if pABar < 0.5:
            return Smooth.ABSTAIN, 0.0
        radius = self._noise.radius(pABar, self.norm or self._noise.default_norm, x.numel())
        return cAHat, float(radius)

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int) -> int:
        """ Monte Carlo algorithm for evaluating the prediction of g at x. With probability at least
        1 - alpha, the class returned by this method will equal g(x).

        The top two counts c1 >= c2 of n votes; ABSTAIN unless the two-sided binomial test of c1 out
        of c1 + c2 at p = 1/2 has p-value <= alpha (Hung & Fithian, https://arxiv.org/abs/1610.03944).

        :param x: the input [channel x height x width]
        :param n: the number of Monte Carlo samples to use
        :param alpha: the failure probability
        :param batch_size: batch size to use when evaluating the base classifier
        :return: the predicted class, or ABSTAIN
        """
        check_positive_int("n", n), check_positive_int("batch_size", batch_size)
        self.base_classifier.eval()
        counts = self._sample_noise(self._as_image(x), n, batch_size)
        return int(predict_from_counts(counts.tolist(), alpha))

    def _sample_noise(self, x: torch.Tensor, num: int, batch_size) -> np.ndarray:
        """ Sample the base classifier's prediction under noisy corruptions of the input x, with noise
        no earlier call has used (a fresh seed per call).

        :param x: the input [channel x height x width]
        :param num: number of samples to collect
        :param batch_size: copies per forward batch
        :return: an ndarray[int] of length num_classes containing the per-class counts
        """
        if int(num) != num or num < 0:
            raise ValueError(f"num must be an integer >= 0, got {num!r}")
        check_positive_int("batch_size", batch_size)
        x = self._as_image(x)
        engine = self._smooth(self._grid(x))
        # The noise of a copy is a pure function of (seed, image 0, copy): a fresh seed per call.
        engine.sampler.seed = self._fresh_seed()
        counts = engine.sampler.run([Job(x, 0, 0, int(num))], int(batch_size))[0]
        return counts.numpy().astype(np.int64)

    def _count_arr(self, arr: np.ndarray, length: int) -> np.ndarray:
        """Per-class counts (int64, ``length``) of an array of class indices."""
        arr = np.asarray(arr, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= length):
            raise IndexError(f"class index out of range [0, {length}) in _count_arr")
        return np.bincount(arr, minlength=length).astype(np.int64)

    def _lower_confidence_bound(self, NA: int, N: int, alpha: float) -> float:
        """ Returns a (1 - alpha) lower confidence bound on a bernoulli proportion.

        This function uses the Clopper-Pearson method: Beta.ppf(alpha, NA, N - NA + 1), 0 when
        NA = 0 (statsmodels' ``proportion_confint(NA, N, alpha=2*alpha, method="beta")[0]``).

        :param NA: the number of "successes"
        :param N: the number of total draws
        :param alpha: the confidence level
        :return: a lower bound on the binomial proportion which holds true w.p at least (1 - alpha)
            over the samples
        """
        return clopper_pearson_lower(NA, N, alpha)
