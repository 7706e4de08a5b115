"""The smoothed classifier: Cohen et al.'s PREDICT and CERTIFY, and sequential CERTIFY, on the engine.

    g(x) = argmax_c P_{eps ~ p}[f(x + eps) = c]

CERTIFY (Cohen, Rosenfeld & Kolter 2019, Algorithm / Theorem 1): n0 selection votes pick c_A; n fresh,
independent votes count n_A; p_lower is the one-sided (1 - alpha) Clopper-Pearson bound on p_A. With
probability >= 1 - alpha over the sampling, either the answer is ABSTAIN or g(x) = c_A on the ball
of the returned radius. The selection votes never enter the bound.

Sequential CERTIFY (DESIGN §4): the same selection; the estimation votes come in rounds and each
image stops as soon as its answer is known (``TargetRadii``: the largest of some radii; or
``AnytimeRadius``: its full radius, to a tolerance), at most n votes. The bound is the anytime-valid
confidence sequence ``stats.anytime_lower``: P(exists t: L_t > p_A) <= alpha, so its value at the
stopping time is a (1 - alpha) lower bound however the stopping depends on the votes (Ville's
inequality), with the same guarantee as CERTIFY's. A Clopper-Pearson bound at a data-dependent n
would not be one.

PREDICT (Cohen et al., Theorem 2): with probability >= 1 - alpha the answer is g(x) or ABSTAIN.

Copy indices (the noise of a copy is a pure function of (seed, image_index, copy)): CERTIFY's
selection uses copies [0, n0), its estimation [n0, n0 + n) (sequentially: [n0, n0 + t), t the votes
used); PREDICT and probabilities use [0, n). Each image's work is a procedure that asks the engine
(``stream.stream``) for copy ranges and gets their votes back; the engine packs the requests of many
images into full batches, so the results do not depend on which images share a batch.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Iterator, Optional, Sequence, Sized, Tuple

import numpy as np
import torch
from torch import nn

from .checks import check_alpha, check_image, check_norm, check_positive_int, positive_float
from .noises import Noise
from .sampler import Job, Sampler
from .seeding import AUTO_INDEX_BASE, fresh_image_index
from .stats import anytime_lower, anytime_upper, clopper_pearson_lower, predict_from_counts
from .stream import Draw, stream
from .tuning import CPU_BATCH


@dataclass
class Certificate:
    """The result of CERTIFY for one image. prediction = -1 means ABSTAIN (radius 0)."""

    prediction: int
    radius: float
    norm: str
    p_lower: float
    n: int
    n0: int
    alpha: float
    counts: torch.Tensor = field(repr=False)   # estimation votes per class (int64)
    counts0: torch.Tensor = field(repr=False)  # selection votes per class (int64)
    image_index: int = 0
    seconds: float = 0.0

    @property
    def abstained(self) -> bool:
        return self.prediction == Smooth.ABSTAIN

    @property
    def n_a(self) -> int:
        """The estimation votes for c_A, the selection's guess (the count behind p_lower)."""
        return int(self.counts[self.counts0.argmax()])


@dataclass
class Prediction:
    """The result of PREDICT for one image. prediction = -1 means ABSTAIN."""

    prediction: int
    n: int
    alpha: float
    counts: torch.Tensor = field(repr=False)
    image_index: int = 0
    seconds: float = 0.0


class Smooth:
    """A randomized-smoothing classifier around ``model`` (which maps inputs in its own input space,
    normalization included, to ``num_classes`` logits).

    backend: "auto" (Triton kernels on CUDA, torch elsewhere), "torch" or "triton".
    precision: "auto" (bf16 on CUDA; on CPUs with AMX / AVX512-BF16 bf16 if a short timed
    calibration finds it faster for this model, cached per model shape and machine; else fp32),
    "fp32", "bf16", "fp16"; noise is always drawn and added in float32, only x + eps is cast (DESIGN §5).
    channels_last: "auto" (CUDA and half precisions; on a CPU, for fp32 convolutional models, timed).
    compile: "auto" (compile when the announced work amortizes it: ``expect(copies)``, or the work of
    the call; cost in ``sampler.compile_seconds``), "on"/True, "off"/False. A model that fails to
    compile runs eagerly, with one line on standard error.
    micro_batch: copies per model call; "auto" runs big models on a CPU in micro-batches that keep
    the largest activation near 8 MB (faster there than whole batches), else whole batches (0).
    input_grid: None, or G for inputs on the grid k / G (8-bit images: 255; x may then be uint8 k):
    every noisy input is formed from integers, fl32((k + round(G delta)) / G), which makes the
    certificate sound in floating point (Voracek & Hein, ICLR 2023; fastsmooth/grid.py). None forms
    x + delta in float32, the common practice of public smoothing code, which is not.
    threads: intra-op threads per call on a CPU; "auto" leaves the cores other processes keep busy
    alone (never more than torch.get_num_threads()).
    batch_size (of the methods): copies per engine batch; "auto" is 1000 on a CPU and fills a GPU.
    Every "auto" choice is in ``metadata``; pass them back explicitly to reproduce a run exactly.
    """

    ABSTAIN = -1
    AUTO_INDEX_BASE = AUTO_INDEX_BASE

    def __init__(self, model: nn.Module, num_classes: int, noise: Noise, *, backend: str = "auto",
                 precision: str = "auto", seed: int = 0, device=None, channels_last="auto",
                 cuda_graph="auto", compile="auto", micro_batch="auto", input_grid=None, threads="auto"):
        self.sampler = Sampler(model, num_classes, noise, backend=backend, precision=precision,
                               seed=seed, device=device, channels_last=channels_last,
                               cuda_graph=cuda_graph, compile=compile, micro_batch=micro_batch,
                               input_grid=input_grid, threads=threads)
        self.noise = noise
        self.num_classes = self.sampler.num_classes
        # On CUDA the engine queues the next submission before reading this one's counts back, so
        # the device samples while the host computes bounds and the caller writes results. On a
        # CPU it would merely hold results back.
        self.overlap = self.sampler.device.type == "cuda"

    @staticmethod
    def _index(image_index: Optional[int]) -> int:
        """The data-set index, or for None a fresh index (2^31 and up) that no call of this process,
        in any instance, has taken (seeding.fresh_image_index)."""
        if image_index is None:
            return fresh_image_index()
        if isinstance(image_index, bool) or int(image_index) != image_index or not 0 <= image_index < 2 ** 32:
            raise ValueError(f"image_index must be an integer in [0, 2^32), got {image_index!r}")
        return int(image_index)

    def _image(self, x) -> torch.Tensor:
        return check_image(x, self.sampler.input_grid)

    def _checked(self, items: Iterable) -> Iterator[Tuple[int, torch.Tensor]]:
        """(image_index, x) pairs, each checked as it is pulled (a bad one fails after the good ones
        before it have been handed out)."""
        for item in items:
            try:
                index, x = item
            except (TypeError, ValueError):
                raise ValueError("certify_many / predict_many take (image_index, x) pairs, e.g. "
                                 "enumerate(images)") from None
            yield self._index(index), self._image(x)

    def expect(self, copies: int) -> None:
        """Announce the noisy copies to come in all (images x (n0 + n)): compile="auto" weighs the
        compile time against that work (certify_many of a list announces its own)."""
        self.sampler.expect(copies)

    @property
    def metadata(self) -> dict:
        """What defines the base classifier and the sampling: to be stored beside the results.
        ``compile_seconds`` and ``tuning`` (why each "auto" choice came out as it did) are
        information, not settings: they may differ between runs of the same settings."""
        s = self.sampler
        return {"noise": self.noise.spec(), "backend": s.backend.name, "precision": s.precision,
                "channels_last": s.channels_last, "cuda_graph": s.cuda_graph, "compile": s.compile,
                "micro_batch": s.micro_batch, "seed": s.seed, "input_grid": s.input_grid, "device": str(s.device),
                "compile_seconds": round(s.compile_seconds, 3), "tuning": dict(s.tuning)}

    # -- CERTIFY ---------------------------------------------------------------------------
    def certify(self, x: torch.Tensor, n0: int = 100, n: int = 100_000, alpha: float = 0.001,
                batch_size="auto", norm: Optional[str] = None, image_index: Optional[int] = None, *,
                radii: Optional[Sequence[float]] = None, sequential: bool = False,
                tolerance: float = 0.01) -> Certificate:
        """Certify one image x (CHW, in the model's input space).

        image_index keys the noise; None (the default) takes a fresh index per call, so repeated
        calls draw independent noise and their failures are independent. Pass the data-set index
        to reproduce a row of ``certify_many`` or of the CLI. radii / sequential: see certify_many.
        """
        return next(self.certify_many([(self._index(image_index), x)], n0=n0, n=n, alpha=alpha,
                                      batch_size=batch_size, norm=norm, radii=radii,
                                      sequential=sequential, tolerance=tolerance))

    def certify_many(self, items: Iterable[Tuple[int, torch.Tensor]], n0: int = 100, n: int = 100_000,
                     alpha: float = 0.001, batch_size="auto", norm: Optional[str] = None,
                     images_per_group: Optional[int] = None, *, radii: Optional[Sequence[float]] = None,
                     sequential: bool = False, tolerance: float = 0.01) -> Iterator[Certificate]:
        """Certify a stream of (image_index, x); yields one Certificate per image, in order.

        Default: Cohen's CERTIFY with n estimation votes. ``radii=[r1, r2, ...]``: the largest of
        them certifiable within n votes (the radius reported is that target, or 0 with the
        prediction, or ABSTAIN), each image stopping as soon as that is known. ``sequential=True``:
        the full radius, each image stopping when going on to n votes would raise it by less than
        ``tolerance`` (relative). Sequential certificates use the anytime-valid bound; their ``n``
        is the estimation votes used. ``images_per_group`` caps the images in flight at once.
        """
        n0, n = check_positive_int("n0", n0), check_positive_int("n", n)
        alpha = check_alpha(alpha)
        norm = check_norm(norm or self.noise.default_norm)
        rule = self._rule_maker(radii, sequential, tolerance, norm, alpha, n)
        items, batch_size = self._batch(items, batch_size, expected_copies(n0, n, radii, sequential))
        if images_per_group is not None:
            images_per_group = check_positive_int("images_per_group", images_per_group)

        def start(index, x):
            if rule is None:
                return self._certify(index, x, n0, n, alpha, norm)
            return self._certify_sequential(index, x, n0, alpha, norm, rule(x.numel()))

        for cert, seconds in stream(self.sampler, items, start, batch_size,
                                    overlap=self.overlap, max_images=images_per_group):
            cert.seconds = seconds
            yield cert

    def _certify(self, index: int, x: torch.Tensor, n0: int, n: int, alpha: float, norm: str):
        """Cohen's CERTIFY for one image, as an engine procedure. The selection and estimation
        copies are drawn in one round: the estimation votes are counted for every class and n_A =
        counts[c_A] is read once c_A = argmax(counts0) is known. The two ranges are disjoint, hence
        independent, so conditionally on c_A, n_A ~ Binomial(n, p_{c_A}): Cohen's law exactly."""
        counts0, counts = yield Draw(0, n0), Draw(n0, n)
        c_a = int(counts0.argmax())  # the selection's guess: ties to the lowest class
        p_lower = self._lower_bound(int(counts[c_a]), n, alpha, x)
        if p_lower <= 0.5:  # DESIGN §4: certify only when p_lower > 1/2
            prediction, radius = self.ABSTAIN, 0.0
        else:
            prediction, radius = c_a, self.noise.radius(p_lower, norm, x.numel())
        return Certificate(prediction, radius, norm, p_lower, n, n0, alpha, counts, counts0, index)

    def _certify_sequential(self, index: int, x: torch.Tensor, n0: int, alpha: float, norm: str, rule):
        """Sequential CERTIFY for one image: Cohen's selection, then estimation votes in rounds until
        ``rule`` stops; p_lower is the anytime bound at the stopping time, minus tau."""
        counts0, counts = yield Draw(0, n0), Draw(n0, rule.first_round)
        c_a = int(counts0.argmax())  # the selection's guess, never in the bound
        t = rule.first_round
        while more := rule.next_round(int(counts[c_a]), t):
            (new,) = yield (Draw(n0 + t, more),)
            counts, t = counts + new, t + more
        p_lower = float(rule.p_lower(int(counts[c_a]), t))
        prediction, radius = rule.answer(c_a, p_lower)
        return Certificate(prediction, radius, norm, p_lower, t, n0, alpha, counts, counts0, index)

    def _rule_maker(self, radii, sequential: bool, tolerance: float, norm: str, alpha: float, cap: int):
        """None for Cohen's CERTIFY, else dim -> the stopping rule for an image of dim elements."""
        tau = self.sampler.tv_bound
        if radii is not None:
            if sequential:
                raise ValueError("radii and sequential exclude each other: radii already stops sequentially")
            radii = check_radii(radii)
            return lambda dim: TargetRadii(radii, self.noise, norm, dim, alpha, cap, tau(dim))
        if sequential:
            tolerance = positive_float(tolerance, "tolerance")
            return lambda dim: AnytimeRadius(tolerance, self.noise, norm, dim, alpha, cap, tau(dim))
        return None

    def _batch(self, items, batch_size, copies_per_image: int):
        """(checked items, batch size): "auto" resolved by the engine for the first image's shape
        (peeked, then put back). A list of images also announces its work (expect) for
        compile="auto"."""
        if isinstance(items, Sized):
            self.sampler.expect(len(items) * copies_per_image)
        items = self._checked(items)
        if not (isinstance(batch_size, str) and batch_size == "auto"):
            return items, check_positive_int("batch_size", batch_size)
        first = next(items, None)
        if first is None:
            return iter(()), CPU_BATCH
        return itertools.chain([first], items), self.sampler.batch_size_for(tuple(first[1].shape))

    def _lower_bound(self, n_a: int, n: int, alpha: float, x: torch.Tensor) -> float:
        # A sampler at total-variation distance tau from the ideal noise moves p_A by at most tau
        # (DESIGN §5), so tau comes off the Clopper-Pearson bound.
        tau = self.sampler.tv_bound(x.numel())
        return max(0.0, clopper_pearson_lower(n_a, n, alpha) - tau)

    # -- PREDICT ---------------------------------------------------------------------------
    def predict(self, x: torch.Tensor, n: int = 100_000, alpha: float = 0.001, batch_size="auto",
                image_index: Optional[int] = None) -> int:
        """Cohen's PREDICT for one image: the class, or -1 (ABSTAIN). image_index as in certify.

        The test is on the sampler's law; it differs from the ideal noise's by at most tau per copy
        (``sampler.tv_bound``: <= d/2 2^-40 for the torch samplers, <= d 2^-40 + 2e-9 for the kernels), which
        the binomial test does not take off: the guarantee is for p_A up to that tau.
        """
        return next(self.predict_many([(self._index(image_index), x)], n=n, alpha=alpha, batch_size=batch_size)).prediction

    def predict_many(self, items: Iterable[Tuple[int, torch.Tensor]], n: int = 100_000, alpha: float = 0.001,
                     batch_size="auto", images_per_group: Optional[int] = None) -> Iterator[Prediction]:
        n, alpha = check_positive_int("n", n), check_alpha(alpha)
        items, batch_size = self._batch(items, batch_size, n)

        def start(index, x):
            return self._predict(index, n, alpha)

        for prediction, seconds in stream(self.sampler, items, start, batch_size,
                                          overlap=self.overlap, max_images=images_per_group):
            prediction.seconds = seconds
            yield prediction

    def _predict(self, index: int, n: int, alpha: float):
        """Cohen's PREDICT for one image, as an engine procedure: n votes, the binomial test."""
        (counts,) = yield (Draw(0, n),)
        return Prediction(predict_from_counts(counts.tolist(), alpha), n, alpha, counts, index)

    # -- estimates -------------------------------------------------------------------------
    def probabilities(self, x: torch.Tensor, n: int, batch_size="auto", soft: bool = False,
                      image_index: Optional[int] = None) -> torch.Tensor:
        """Monte-Carlo estimate over n copies: vote frequencies of the hard smoothed classifier g, or
        with soft=True the mean softmax of the soft smoothed classifier G. An estimate, no bound."""
        n = check_positive_int("n", n)
        if not (isinstance(batch_size, str) and batch_size == "auto"):
            batch_size = check_positive_int("batch_size", batch_size)
        totals = self.sampler.run([Job(self._image(x), self._index(image_index), 0, n)], batch_size, soft=soft)[0]
        return totals.double() / n


# -- sequential stopping rules (DESIGN §4): they see counts only --------------------------------------
#
# A rule decides from (k, t), the votes for c_A among the t estimation votes so far: ``stops`` whether
# the image's answer is known, ``answer`` what it is. Round sizes follow from the same rule: the
# next round aims at the smallest t' at which the rule would stop if the votes kept their current
# rate (t' between 1.04 t and 16 t; 2 t where none would do). Both depend on the image's own counts
# only, so its row depends only on (seed, image index). No rule can void the guarantee: the bound
# is anytime-valid at any stopping time, and the upper bound only steers the stopping.

FIRST_ROUND = 500                      # estimation votes of the first round (drawn with the selection)
STEERING_ALPHA = 0.1                   # level of the upper bound that steers TargetRadii (never in a bound)
AIM_GROWTH = 2.0 ** (np.arange(1, 65) / 16)  # the t' tried for the next round: t * 2^(1/16) .. t * 16


class _Rule:
    """What both rules share: the anytime bounds at (k, t) and the aim of the next round."""

    def __init__(self, alpha: float, cap: int, tau: float):
        self.alpha, self.cap, self.tau = alpha, cap, tau
        self.first_round = min(FIRST_ROUND, cap)

    def p_lower(self, k, t):
        """The certificate's bound: the confidence sequence minus the sampler's tau (DESIGN §5)."""
        return np.maximum(anytime_lower(k, t, self.alpha) - self.tau, 0.0)

    def next_round(self, k: int, t: int) -> int:
        """Copies of the next round; 0 when the image stops (its answer known, or the cap reached)."""
        if t >= self.cap:
            return 0
        ahead = np.unique(np.minimum(np.ceil(t * AIM_GROWTH), self.cap).astype(np.int64))
        rate = k / t
        verdicts = self.verdicts(np.r_[k, np.round(rate * ahead).astype(np.int64)], np.r_[t, ahead], rate)
        if verdicts[0]:
            return 0
        would = verdicts[1:]  # at the times ahead, if the votes kept their rate
        target = int(ahead[np.argmax(would)]) if would.any() else min(2 * t, self.cap)
        return target - t

    def stops(self, k: int, t: int) -> bool:
        """Whether the image's answer is known after k votes for c_A among t."""
        return t >= self.cap or bool(self.verdicts(np.array([k]), np.array([t]), k / t)[0])


class TargetRadii(_Rule):
    """The largest of ``radii`` certified within the cap; 0 (c_A without a radius) or ABSTAIN below.

    Stops when the answer is known: the lower bound has passed the threshold p_for_radius of the
    largest target still possible (or 1/2, to predict at all); or the cap. A target is possible
    while the cap could certify it with the rest of the votes coming at the rate of the upper
    confidence sequence at level STEERING_ALPHA = 0.1 (an optimistic rate: p_A exceeds it at some
    time with probability <= 0.1). It steers the stopping only; the certificate is the lower bound.
    The radius reported is that target: the certificate answers the question asked (the anytime
    bound may support more, see ``p_lower``, but the stopping did not look further)."""

    def __init__(self, radii: Sequence[float], noise: Noise, norm: str, dim: int, alpha: float, cap: int, tau: float):
        super().__init__(alpha, cap, tau)
        self.radii = [0.0] + [r for r in radii if r > 0]
        self.noise, self.norm, self.dim = noise, norm, dim
        self.thresholds = np.array(_thresholds(noise, tuple(self.radii[1:]), norm, dim))

    def level(self, p):
        """-1 (abstain) if p <= 1/2; else the number of thresholds p has passed (0 .. len(radii))."""
        p = np.asarray(p, dtype=np.float64)
        return np.where(p > 0.5, np.searchsorted(self.thresholds, p, side="right"), -1)

    def verdicts(self, k, t, rate):
        """Stop at (k[i], t[i])? The certified level has reached the highest one still possible:
        the level the bound would reach at the cap with the votes so far and the rest coming at
        the rate of the upper confidence sequence (at level STEERING_ALPHA)."""
        certified = self.level(self.p_lower(k, t))
        upper = anytime_upper(k, t, STEERING_ALPHA)
        possible = self.level(self.p_lower(k + np.floor(upper * (self.cap - t)).astype(np.int64), self.cap))
        return certified >= possible

    def answer(self, c_a: int, p_lower: float) -> Tuple[int, float]:
        level = int(self.level(p_lower))
        while level > 0 and self.noise.radius(p_lower, self.norm, self.dim) < self.radii[level]:
            level -= 1  # a threshold that rounding put a hair too low
        return (Smooth.ABSTAIN, 0.0) if level < 0 else (c_a, self.radii[level])


class AnytimeRadius(_Rule):
    """The radius of the anytime bound, stopped when going on to the cap would raise it by less than
    ``tolerance`` (relative) if the votes kept their current rate; ABSTAIN when p_lower <= 1/2."""

    def __init__(self, tolerance: float, noise: Noise, norm: str, dim: int, alpha: float, cap: int, tau: float):
        super().__init__(alpha, cap, tau)
        self.tolerance, self.noise, self.norm, self.dim = tolerance, noise, norm, dim

    def _radius(self, p) -> float:
        return self.noise.radius(float(p), self.norm, self.dim)

    def _goal(self, rate: float) -> float:
        """The radius to reach: that of the cap at this vote rate, less the tolerance."""
        return self._radius(self.p_lower(round(rate * self.cap), self.cap)) / (1.0 + self.tolerance)

    def verdicts(self, k, t, rate):
        """Stop at (k[0], t[0])? Its radius is within the tolerance of the cap's at ``rate``. For the
        other entries (the times ahead at that rate) the same, by a bisection: at a fixed rate
        p_lower grows with t (up to the rounding of the votes), and the radius with p_lower."""
        lowers, goal = self.p_lower(k, t), self._goal(rate)
        verdicts = np.zeros(len(t), dtype=bool)
        verdicts[0] = self._radius(lowers[0]) >= goal
        lo, hi = 1, len(t)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self._radius(lowers[mid]) >= goal else (mid + 1, hi)
        verdicts[lo:] = True
        return verdicts

    def answer(self, c_a: int, p_lower: float) -> Tuple[int, float]:
        if p_lower <= 0.5:
            return Smooth.ABSTAIN, 0.0
        return c_a, self.noise.radius(p_lower, self.norm, self.dim)


def expected_copies(n0: int, n: int, radii=None, sequential: bool = False) -> int:
    """Copies an image is expected to draw, announced for compile="auto" only (never a limit):
    n0 + n for CERTIFY and --sequential (most images there run close to the cap); for target radii a
    tenth of the cap (0.07 on the embedded default: clear images stop near 1e4 votes)."""
    return n0 + (n // 10 if radii is not None else n)


def check_radii(radii) -> list:
    """Target radii: finite numbers >= 0, as a sorted list without repeats (0 is always implied)."""
    try:
        values = sorted({float(r) for r in radii})
    except (TypeError, ValueError):
        raise ValueError(f"radii must be a list of numbers >= 0, got {radii!r}") from None
    if not values or any(not math.isfinite(r) or r < 0 for r in values):
        raise ValueError(f"radii must be a non-empty list of finite numbers >= 0, got {radii!r}")
    return values


@lru_cache(maxsize=256)
def _thresholds(noise: Noise, radii: tuple, norm: str, dim: int) -> list:
    """p_for_radius of each target (inf for a target no p_lower certifies), once per image size."""
    return [noise.p_for_radius(r, norm, dim) for r in radii]
