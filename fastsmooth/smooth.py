"""The smoothed classifier: Cohen et al.'s PREDICT and CERTIFY on top of the engine.

    g(x) = argmax_c P_{eps ~ p}[f(x + eps) = c]

CERTIFY (Cohen, Rosenfeld & Kolter 2019, Algorithm / Theorem 1): n0 selection votes pick c_A; n fresh,
independent votes count n_A; p_lower is the one-sided (1 - alpha) Clopper-Pearson bound on p_A. With
probability >= 1 - alpha over the sampling, either the answer is ABSTAIN or g(x) = c_A on the ball
of the returned radius. The selection votes never enter the bound.

PREDICT (Cohen et al., Theorem 2): with probability >= 1 - alpha the answer is g(x) or ABSTAIN.

Copy indices (the noise of a copy is a pure function of (seed, image_index, copy)): CERTIFY's
selection uses copies [0, n0), its estimation [n0, n0 + n); PREDICT and probabilities use [0, n).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sized, Tuple

import torch
from torch import nn

from .checks import check_alpha, check_image, check_norm, check_positive_int
from .noises import Noise
from .sampler import Job, Sampler
from .seeding import AUTO_INDEX_BASE, fresh_image_index
from .tuning import CPU_BATCH
from .stats import clopper_pearson_lower, predict_from_counts


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


def _groups(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive (index, x) items in groups of at most ``size`` images of one shape (the images
    of a group share batches). Items are pulled lazily: a group is yielded as soon as it is full."""
    group: list = []
    for item in items:
        if group and tuple(item[1].shape) != tuple(group[0][1].shape):
            yield group
            group = []
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


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
        # certify_many / predict_many queue the next group of images before reading this group's
        # counts back, so that the device samples it while the host computes bounds and the caller
        # writes results. Only where the device runs asynchronously: on a CPU it would merely hold
        # results back by one group.
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
                batch_size="auto", norm: Optional[str] = None,
                image_index: Optional[int] = None) -> Certificate:
        """Certify one image x (CHW, in the model's input space).

        image_index keys the noise; None (the default) takes a fresh index per call, so repeated
        calls draw independent noise and their failures are independent. Pass the data-set index
        to reproduce a row of ``certify_many`` or of the CLI.
        """
        return next(self.certify_many([(self._index(image_index), x)], n0=n0, n=n,
                                      alpha=alpha, batch_size=batch_size, norm=norm))

    def certify_many(self, items: Iterable[Tuple[int, torch.Tensor]], n0: int = 100, n: int = 100_000,
                     alpha: float = 0.001, batch_size="auto", norm: Optional[str] = None,
                     images_per_group: Optional[int] = None) -> Iterator[Certificate]:
        """Certify a stream of (image_index, x); yields one Certificate per image, in order.

        The selection and estimation copies of an image run in one pass of the engine, read back
        once: the estimation votes are counted for every class, and n_A = counts[c_A] is taken
        after c_A = argmax(counts0) is known. This is Cohen's CERTIFY exactly: the two phases use
        disjoint copies, hence independent noise, so conditionally on c_A, n_A ~ Binomial(n, p_{c_A}).
        Images whose whole work is smaller than a batch are grouped so that they share batches;
        ``images_per_group`` overrides the group size.
        """
        n0, n = check_positive_int("n0", n0), check_positive_int("n", n)
        alpha = check_alpha(alpha)
        norm = check_norm(norm or self.noise.default_norm)
        items, batch_size = self._batch(items, batch_size, n0 + n)
        group_size = images_per_group or max(1, min(16, batch_size // (n0 + n)))

        def jobs(group):  # selection copies [0, n0) and estimation copies [n0, n0 + n) of each image
            return [job for i, x in group for job in (Job(x, i, 0, n0), Job(x, i, n0, n))]

        for group, totals, seconds in self._run_groups(items, group_size, jobs, batch_size):
            for (index, x), c0, c in zip(group, totals[0::2], totals[1::2]):
                c_a = int(c0.argmax())  # the selection's guess: ties to the lowest class
                p_lower = self._lower_bound(int(c[c_a]), n, alpha, x)
                if p_lower <= 0.5:  # DESIGN §4: certify only when p_lower > 1/2
                    prediction, radius = self.ABSTAIN, 0.0
                else:
                    prediction, radius = c_a, self.noise.radius(p_lower, norm, x.numel())
                yield Certificate(prediction, radius, norm, p_lower, n, n0, alpha, c, c0, index, seconds)

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

    def _run_groups(self, items, group_size: int, jobs_of, batch_size: int):
        """Yield (group, its totals, seconds per image) for consecutive groups of images.

        With ``overlap``, group k + 1 is queued on the device before group k's totals are read back.
        The results are the same either way: the noise of a copy depends on (seed, image, copy) only.
        Seconds per image: from when the group was queued (or the previous group's totals were back,
        if later) to when its totals are back.
        """
        pending, last_done = None, -math.inf
        groups = _groups(items, group_size)
        while True:
            try:  # reading the next images (their loading may fail) and queuing their work
                group = next(groups, None)
                if group is not None:
                    start = time.perf_counter()
                    queued = (group, self.sampler.submit(jobs_of(group), batch_size), start)
            except BaseException:
                if pending is not None:  # the previous group's work is done: hand it out first
                    yield self._collect(pending, last_done)[0]
                raise
            if group is None:
                break
            if pending is not None:
                done, last_done = self._collect(pending, last_done)
                yield done
            pending = queued
            if not self.overlap:
                done, last_done = self._collect(pending, last_done)
                pending = None
                yield done
        if pending is not None:
            yield self._collect(pending, last_done)[0]

    @staticmethod
    def _collect(pending, last_done: float):
        """((group, totals, seconds per image), when the totals were back) of a queued group."""
        group, totals, start = pending
        totals = totals.result()
        done = time.perf_counter()
        return (group, totals, (done - max(start, last_done)) / len(group)), done

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
        return next(self.predict_many([(self._index(image_index), x)], n=n, alpha=alpha,
                                      batch_size=batch_size)).prediction

    def predict_many(self, items: Iterable[Tuple[int, torch.Tensor]], n: int = 100_000, alpha: float = 0.001,
                     batch_size="auto", images_per_group: Optional[int] = None) -> Iterator[Prediction]:
        n, alpha = check_positive_int("n", n), check_alpha(alpha)
        items, batch_size = self._batch(items, batch_size, n)
        group_size = images_per_group or max(1, min(16, batch_size // n))

        def jobs(group):
            return [Job(x, i, 0, n) for i, x in group]

        for group, counts, seconds in self._run_groups(items, group_size, jobs, batch_size):
            for (index, _), c in zip(group, counts):
                yield Prediction(predict_from_counts(c.tolist(), alpha), n, alpha, c, index, seconds)

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
