"""The engine: noisy copies -> model -> votes, on one device, with no statistics in it.

Work is a list of ``Job``s (one image, a range of copy indices); the engine packs the copies of all
jobs into full batches of one reusable buffer, runs the model and accumulates per-job vote counts
(or softmax sums) on the model's device, and reads them back once, at the end of the call.

Reproducibility (DESIGN §5): the noise of copy c of image i is a pure function of (seed, i, c) on
every backend (one Philox stream, seeding.py), so counts do not depend on batch size nor on which
images share a batch. With ``input_grid`` = G the model sees fl32((k + nu) / G) for inputs k / G
(grid.py: sound in floating point, Voracek & Hein 2023).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from . import tuning
from .allocator import tune_cpu_allocator
from .backends import make_backend
from .cpu import CpuLoad, choose_threads, has_bf16_units, usable_cores
from .grid import check_input_grid, grid_indices
from .noises import Noise
from .seeding import DOMAIN_CERTIFY

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLogitsError(RuntimeError):
    """The base classifier produced NaN or inf logits: such a copy has no vote (DESIGN §5)."""


@dataclass(frozen=True)
class Job:
    """Copies ``first_copy .. first_copy + count - 1`` of image ``image_index`` (pixels ``x``, CHW)."""

    x: torch.Tensor
    image_index: int
    first_copy: int
    count: int


@dataclass(frozen=True)
class Segment:
    """Rows ``row .. row + count - 1`` of a batch hold copies ``first_copy ..`` of packed image ``slot``."""

    slot: int
    image_index: int
    first_copy: int
    count: int
    row: int


# On a CPU, bf16 autocast pays off for some models and not others, and the flags do not tell which
# (measured here with AMX: ResNet-20 ran 1.7x faster in bf16; the 0.4 M multiply-add embedded CNN once
# 2.5x slower, later 1.2x faster with malloc tuned): "auto" times both (Sampler.prepare, tuning.py)
# wherever the CPU has bf16 units (cpu.has_bf16_units). Without timings (FASTSMOOTH_TUNING=off) it
# falls back to this rule, deterministic given the model: bf16 from 5 M multiply-adds per copy.
CPU_BF16_MIN_MACS = 5_000_000
TUNING_ENV = "FASTSMOOTH_TUNING"


def tuning_enabled() -> bool:
    """Timed calibrations for "auto" choices, unless $FASTSMOOTH_TUNING is "off" (fixed rules)."""
    return os.environ.get(TUNING_ENV, "on").lower() not in ("off", "0", "no", "false")


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The model's dtype; None for "auto" on a CPU with bf16 units (Sampler.prepare measures it)."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        if device.type != "cpu" or not has_bf16_units():
            return torch.float32
        return None
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected auto, {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


@dataclass(frozen=True)
class ModelProbe:
    """What one forward of one input costs: multiply-adds over Conv and Linear layers, and the
    elements of the largest tensor any module outputs (the activation that sets the working set)."""

    macs: int
    largest_activation: int


@torch.inference_mode()
def probe_model(model: nn.Module, shape, device) -> ModelProbe:
    """One probe forward of a zero input of ``shape`` (batch 1), with hooks on every module."""
    macs, largest = 0, 0

    def hook(module, inputs, output):
        nonlocal macs, largest
        if not isinstance(output, torch.Tensor):
            return
        largest = max(largest, output.numel())
        if isinstance(module, nn.modules.conv._ConvNd):
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
            macs += output.numel() * per_output
        elif isinstance(module, nn.Linear):
            macs += output.numel() * module.in_features

    if not any(isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) for m in model.modules()):
        return ModelProbe(0, 0)  # nothing to count: spare the model a probe forward
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        model(torch.zeros((1, *shape), device=device))
    finally:
        for h in handles:
            h.remove()
    return ModelProbe(macs, largest)


# On a CPU, a batch of many copies of a big model runs faster as a sequence of micro-batches whose
# activations stay in the caches. Measured here (2-core Xeon with AMX), per 1000 CIFAR copies, the
# whole batch at once against micro-batches: ResNet-20 bf16 channels_last 263-486 ms at 1000, 194-305 ms at
# 256; ResNet-110 bf16 1819 against 1208 ms at 256; ResNet-20 fp32 1340 against 565 ms at 128. The
# best micro-batch held about 8 MB of the largest activation. Small models want big batches instead (the
# embedded CNN: 6.1 ms per 1000 copies at 1000, 10.5 ms at 50), so only models of at least
# CPU_BF16_MIN_MACS multiply-adds per copy are split. The rule is deterministic (a resumed run
# resolves it the same way); the micro-batch is recorded with the results, like the precision.
CPU_MICRO_BATCH_BYTES = 8 << 20  # of the largest activation
MIN_MICRO_BATCH = 16


def resolve_micro_batch(micro_batch, device: torch.device, dtype: torch.dtype, probe: Optional[ModelProbe]) -> int:
    """Copies per model call (0: the whole batch in one call); for "auto" on a CPU it needs ``probe``."""
    if micro_batch != "auto":
        if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 0:
            raise ValueError(f"micro_batch must be 'auto' or a non-negative integer, got {micro_batch!r}")
        return micro_batch
    if device.type != "cpu" or probe.macs < CPU_BF16_MIN_MACS or probe.largest_activation == 0:
        return 0
    per_copy = probe.largest_activation * dtype.itemsize
    fit = max(MIN_MICRO_BATCH, CPU_MICRO_BATCH_BYTES // per_copy)
    return 1 << (fit.bit_length() - 1)  # a power of two: full batches of 1000 split evenly enough


def model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


class Sampler:
    """Runs a base classifier on noisy copies and counts its votes.

    ``precision`` is the dtype the perturbed input x + eps is cast to and the model runs in (bf16 /
    fp16 through autocast): that cast is part of the base classifier being certified (DESIGN §5).
    ``input_grid``: None (x + eps formed in float32: the common practice, not sound in floating point),
    or G for inputs on the grid k / G (8-bit images: 255), whose noisy copies are formed from integers.
    """

    def __init__(self, model: nn.Module, num_classes: int, noise: Noise, *, backend: str = "auto",
                 precision: str = "auto", seed: int = 0, device=None, channels_last="auto",
                 cuda_graph="auto", compile="auto", micro_batch="auto", threads="auto", input_grid=None):
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if not isinstance(noise, Noise):
            raise TypeError(f"noise must be a fastsmooth noise (Gaussian, Laplace, ...), got {noise!r}")
        self.device = torch.device(device) if device is not None else model_device(model)
        if self.device.type == "cpu":
            tune_cpu_allocator()  # forwards stop faulting in fresh pages for every batch (allocator.py)
        self.model = model.to(self.device).eval()
        self.num_classes = int(num_classes)
        self.noise = noise
        self.seed = int(seed)
        self.input_grid = check_input_grid(input_grid)
        if channels_last != "auto" and not isinstance(channels_last, bool):
            raise ValueError(f"channels_last must be 'auto' or a bool, got {channels_last!r}")
        self._precision_request, self._channels_last_request = precision, channels_last
        self.dtype = resolve_precision(precision, self.device)  # None: "auto", measured by prepare()
        self.channels_last = False
        self._layout_resolved = False  # precision and layout final (prepare)
        self.backend = make_backend(backend, self.device)
        self._buffer: Optional[torch.Tensor] = None
        self._slots: Optional[torch.Tensor] = None
        # On CUDA the forward of a full batch is captured once in a CUDA graph over the static batch
        # buffer and replayed: one launch instead of one per layer. Falls back to eager if capture fails.
        self.cuda_graph = self.device.type == "cuda" if cuda_graph == "auto" else bool(cuda_graph)
        self._graphs = {}  # (buffer pointer, batch shape) -> (graph, its static logits)
        # torch.compile ("auto": when the announced work amortizes it, see _decide_compile). The
        # compiled forward is part of the base classifier (its numerics may differ from eager in the
        # last bits), so whether it ran is recorded with the results like the precision.
        self._compile_request = tuning.parse_compile(compile)
        self.compile = self._compile_request == "on"
        self._compile_decided = self._compile_request != "auto"
        self._compiled: Optional[tuning.CompiledModel] = None
        self._compiled_rows: set = set()  # the call sizes compiled (one static shape each)
        self._call_size = 0  # rows of every call of the compiled model (the last size compiled)
        self._fallbacks = 0  # compiled models dropped for failing (each time: eager from then on)
        self.compile_seconds = 0.0  # compiling's wall time (first call of each shape minus a call)
        self._expected_copies = 0   # the work announced by expect()
        self._eager_seconds: Optional[float] = None  # the chosen configuration's, once measured
        self._auto_batch: Optional[int] = None       # batch_size="auto", once resolved
        # Why each "auto" choice came out as it did (timings, estimates): recorded with the results
        # for information; a resumed run reuses the choices themselves, not these figures.
        self.tuning: dict = {}
        # Copies per model call, 0 for the whole batch ("auto" until prepare(), see
        # resolve_micro_batch). Which copies share a call can change a model's last bits, so this
        # too is recorded with the results.
        self._micro_batch_request = micro_batch
        self.micro_batch = (micro_batch if micro_batch == "auto"
                            else resolve_micro_batch(micro_batch, self.device, torch.float32, None))
        # Intra-op threads per call on a CPU ("auto": the cores other processes leave free, never
        # more than torch.get_num_threads(); cpu.choose_threads). They change no result (cpu.py).
        if threads != "auto" and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be 'auto' or a positive integer, got {threads!r}")
        self.threads = threads
        self._load = CpuLoad() if self.device.type == "cpu" and threads == "auto" else None
        self._thread_ceiling = torch.get_num_threads()  # outside the engine's calls (cache keys)
        self._in_call = False
        if self.device.type != "cpu" or not tuning_enabled():
            self._resolve_by_rule()

    # -- the "auto" choices ----------------------------------------------------------------------
    def expect(self, copies: int) -> None:
        """Announce the noisy copies the caller will draw in all (all images, n0 + n each): with
        compile="auto" the engine compiles when that work amortizes the compile. Raises an earlier
        figure, never lowers it; effective until the decision, which the first call makes."""
        self._expected_copies = max(self._expected_copies, int(copies))

    def _resolve_by_rule(self, macs: Optional[int] = None) -> None:
        """Precision and layout without timings: bf16 on CUDA and (FASTSMOOTH_TUNING=off) on bf16
        CPUs from CPU_BF16_MIN_MACS; channels_last on CUDA and for half precisions."""
        if self.dtype is None:
            if macs is None:
                return  # needs the model's multiply-adds: prepare() calls again with them
            self.dtype = torch.bfloat16 if macs >= CPU_BF16_MIN_MACS else torch.float32
        cl = self._channels_last_request
        self._set_layout(self.device.type == "cuda" or self.dtype != torch.float32 if cl == "auto" else bool(cl))

    def _set_layout(self, channels_last: bool) -> None:
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._layout_resolved = True

    def _candidates(self, shape, probe: "ModelProbe") -> list:
        """(dtype, channels_last) pairs worth timing on this CPU: fp32 and (with bf16 units) bf16,
        channels_last for half precisions and, for convolutional models of >= CPU_BF16_MIN_MACS
        multiply-adds, both layouts for fp32 (smaller ones keep NCHW: the layout matters little)."""
        dtypes = [self.dtype] if self.dtype is not None else [torch.float32, torch.bfloat16]
        cl = self._channels_last_request
        images = len(shape) == 3 and any(isinstance(m, nn.Conv2d) for m in self.model.modules())
        out = []
        for dtype in dtypes:
            if cl != "auto":
                layouts = [bool(cl)]
            elif dtype != torch.float32:
                layouts = [True]
            elif images and probe.macs >= CPU_BF16_MIN_MACS:
                layouts = [False, True]
            else:
                layouts = [False]
            out += [(dtype, layout) for layout in layouts]
        return out

    @staticmethod
    def _label(dtype, channels_last, micro_batch) -> str:
        name = {v: k for k, v in PRECISIONS.items()}[dtype]
        return f"{name}/{'channels_last' if channels_last else 'nchw'}/micro_batch={micro_batch}"

    def _calibrate(self, shape, probe, candidates) -> dict:
        """Seconds per copy of the eager forward of each candidate (label -> s), from the cache for
        this model shape and machine, else timed (tuning.best_seconds, interleaved) and cached."""
        micro = {c: resolve_micro_batch(self._micro_batch_request, self.device, c[0], probe) for c in candidates}
        labels = {c: self._label(*c, micro[c]) for c in candidates}
        cache = tuning.TuningCache()
        key = self._fingerprint(shape, "eager:" + ",".join(sorted(labels.values())))
        cached = cache.get(key).get("seconds_per_copy") or {}
        if all(isinstance(cached.get(label), (int, float)) for label in labels.values()):
            self.tuning["calibration"] = {"source": "cache", "seconds_per_copy": cached}
            return {c: cached[labels[c]] for c in candidates}
        rows = {c: micro[c] or 256 for c in candidates}  # one model call each
        layouts = {c[1] for c in candidates}
        models = {layout: self.model for layout in layouts}
        if len(layouts) == 2:
            # A copy in channels_last, so that no timed call converts the weights; where the model
            # cannot be copied, each call converts them in place (a small share of a forward).
            try:
                models[True] = copy.deepcopy(self.model)
            except Exception:
                models = None
        runs = {}
        for c in candidates:
            x = tuning.probe_batch(rows[c], shape, self.device, *c)
            if models is not None:
                models[c[1]].to(memory_format=torch.channels_last if c[1] else torch.contiguous_format)

            def run(c=c, x=x):
                if models is None:
                    self.model.to(memory_format=torch.channels_last if c[1] else torch.contiguous_format)
                    return tuning.eager_forward(self.model, x, c[0], micro[c])
                return tuning.eager_forward(models[c[1]], x, c[0], micro[c])

            runs[labels[c]] = run
        per_call = tuning.best_seconds(runs, self.device)
        out = {c: per_call[labels[c]] / rows[c] for c in candidates}
        self.model.to(memory_format=torch.contiguous_format)
        cache.update(key, seconds_per_copy={labels[c]: out[c] for c in candidates})
        self.tuning["calibration"] = {"source": "measured", "seconds_per_copy": {labels[c]: out[c] for c in candidates}}
        return out

    def prepare(self, shape, batch_size: Optional[int] = None, copies: int = 0) -> None:
        """Resolve the "auto" choices for inputs of ``shape`` (once each): precision and layout (on a
        CPU by a timed calibration, tuning.py), the copies per model call (resolve_micro_batch) and
        whether to compile (by the work announced with expect(), or ``copies``, this call's); then
        build the compiled model for calls of this ``batch_size`` if needed (or rebuild it if the
        model's weights changed since)."""
        with self.threads_for_call():
            self._prepare(tuple(shape), batch_size, copies)

    def decide(self, shape, batch_size: Optional[int] = None, copies: int = 0) -> None:
        """prepare() without building the compiled model: every choice made, nothing compiled yet
        (what a torchrun job's rank 0 hands the other processes, which then compile alongside it)."""
        with self.threads_for_call():
            self._decide(tuple(shape), batch_size, copies)

    def _decide(self, shape, batch_size, copies) -> None:
        self._resolve_layout(shape)
        if not self._compile_decided:
            self._decide_compile(shape, max(self._expected_copies, int(copies)), batch_size)
            self._compile_decided = True

    def _prepare(self, shape, batch_size, copies) -> None:
        self._decide(shape, batch_size, copies)
        if self.compile:
            self._ensure_compiled(shape, batch_size)

    def _resolve_layout(self, shape) -> None:
        """Precision, layout and micro-batch, once: timed on a CPU (tuning.py), else by rule."""
        if not self._layout_resolved or self.micro_batch == "auto":
            probe = probe_model(self.model, shape, self.device) if self.device.type == "cpu" else None
            if not self._layout_resolved:
                if self.device.type != "cpu" or not tuning_enabled():
                    self._resolve_by_rule(probe.macs if probe is not None else 0)
                else:
                    candidates = self._candidates(shape, probe)
                    if len(candidates) == 1:
                        self.dtype = candidates[0][0]
                        self._set_layout(candidates[0][1])
                    else:
                        timed = self._calibrate(shape, probe, candidates)
                        best = min(candidates, key=lambda c: timed[c])
                        fp32 = [c for c in candidates if c[0] == torch.float32]
                        if best[0] != torch.float32 and fp32:
                            # bf16 only when clearly faster than the best fp32 layout
                            best_fp32 = min(fp32, key=lambda c: timed[c])
                            if timed[best_fp32] < tuning.BF16_MIN_GAIN * timed[best]:
                                best = best_fp32
                        self.dtype = best[0]
                        self.model.to(memory_format=torch.contiguous_format)
                        self._set_layout(best[1])
                        self._eager_seconds = timed[best]
            if self.micro_batch == "auto":
                self.micro_batch = resolve_micro_batch("auto", self.device, self.dtype, probe)

    def batch_size_for(self, shape) -> int:
        """The batch for batch_size="auto": on a CPU tuning.CPU_BATCH (1000; micro-batches keep the
        activations in the caches); on a GPU the size after which doubling stops paying, up to half
        the free memory (tuning.measure_gpu_batch), measured once per model shape and GPU (cached)."""
        if self._auto_batch is not None:
            return self._auto_batch
        with self.threads_for_call():
            return self._batch_size_for(tuple(shape))

    def _batch_size_for(self, shape) -> int:
        self._resolve_layout(shape)
        if self.device.type != "cuda" or not tuning_enabled():
            self._auto_batch = tuning.CPU_BATCH
            return self._auto_batch
        cache = tuning.TuningCache()
        key = self._fingerprint(shape, f"batch:{self.precision}:{self.channels_last}")
        cached = cache.get(key).get("batch")
        if isinstance(cached, int) and cached > 0:
            self._auto_batch = cached
            self.tuning["batch"] = {"batch": cached, "source": "cache"}
            return cached

        def make_run(rows):
            x = tuning.probe_batch(rows, shape, self.device, self.dtype, self.channels_last)
            return lambda: tuning.eager_forward(self.model, x, self.dtype, self.micro_batch)

        batch, details = tuning.measure_gpu_batch(make_run, self.device)
        self._auto_batch = batch
        self.tuning["batch"] = {"batch": batch, "source": "measured", **details}
        cache.update(key, batch=batch, **details)
        return batch

    def _call_rows(self, batch_size: Optional[int]) -> int:
        """Rows of every call of the compiled model: the micro-batch, else the whole batch."""
        return self.micro_batch or int(batch_size or tuning.CPU_BATCH)

    def _eager_seconds_per_copy(self, shape, batch_size, copies: int, estimate, entry: dict) -> float:
        """The eager forward's seconds per copy in the chosen configuration: the one measured beside
        the compiled forward by an earlier compile of this model (``entry``: at the call size,
        interleaved), else the calibration's, else timed at the call size. Timing starts with one
        call of a few copies: it bounds the per-copy time from above (small batches and first calls
        are slower), so if even it saves too little no timing can change the answer, and small
        work pays no more than that call."""
        cached = tuning.median_of(entry.get("eager_seconds_per_copy"))
        if cached is not None:
            return cached
        if self._eager_seconds is not None:
            return self._eager_seconds
        rows = self._call_rows(batch_size) if self.device.type == "cpu" else min(self._call_rows(batch_size), 1024)
        for probe_rows in (min(rows, 16), rows):
            x = tuning.probe_batch(probe_rows, shape, self.device, self.dtype, self.channels_last)
            run = {"eager": lambda: tuning.eager_forward(self.model, x, self.dtype, self.micro_batch)}
            if probe_rows < rows:
                bound = tuning.time_once(run["eager"], self.device) / probe_rows
                if not tuning.should_compile(bound, copies, estimate):
                    return bound
                continue
            self._eager_seconds = tuning.best_seconds(run, self.device, rounds=2)["eager"] / rows
        return self._eager_seconds

    def _fingerprint(self, shape, what: str) -> str:
        """tuning.fingerprint with the thread ceiling of the engine's calls (not the load's count)."""
        return tuning.fingerprint(self.model, shape, self.device, what, threads=self._thread_ceiling)

    def _compile_key(self, shape, batch_size) -> str:
        what = f"compile:{self.precision}:{self.channels_last}:{self._call_rows(batch_size)}"
        return self._fingerprint(shape, what)

    def _decide_compile(self, shape, copies: int, batch_size) -> None:
        """compile="auto": compile when the eager forward time the compiled one is expected to save
        on ``copies`` exceeds the expected compile time (tuning.should_compile). Decided once; a
        resumed run is given the recorded decision instead (cli.py)."""
        if not tuning_enabled():
            self.tuning["compile"] = {"decision": "off", "why": f"{TUNING_ENV}=off: no timings to decide by"}
            return
        modules = sum(1 for _ in self.model.modules())
        entry = tuning.TuningCache().get(self._compile_key(shape, batch_size))
        estimate = tuning.estimate_compile(entry, self.device, modules)
        eager = self._eager_seconds_per_copy(shape, batch_size, copies, estimate, entry)
        self.compile = tuning.should_compile(eager, copies, estimate)
        self.tuning["compile"] = {
            "decision": "on" if self.compile else "off", "copies": copies,
            "eager_seconds_per_copy": eager, "expected_compile_seconds": estimate.seconds,
            "expected_speedup": estimate.speedup, "estimate": estimate.source}

    @torch.inference_mode()
    def _ensure_compiled(self, shape, batch_size) -> None:
        """Build (or, after a weight change, rebuild) the compiled model and compile it for calls of
        _call_rows rows, timing the compile; on failure, one line on stderr and eager from then on."""
        if self._compiled is not None and self._compiled.stale():
            self._compiled, self._compiled_rows = None, set()
            self._graphs.clear()
        rows = self._call_rows(batch_size)
        if self._compiled is not None and rows in self._compiled_rows:
            self._call_size = rows
            return
        x = tuning.probe_batch(rows, shape, self.device, self.dtype, self.channels_last)
        amp = self.dtype != torch.float32
        autocast = functools.partial(torch.autocast, self.device.type, dtype=self.dtype, enabled=amp,
                                     cache_enabled=False)
        with autocast():
            eager = self.model(x)  # outside the try: a model that fails eagerly fails as itself
        try:
            if self._compiled is None:
                self._compiled = tuning.CompiledModel(self.model, self.device)
            out = []
            with autocast():
                first = tuning.time_once(lambda: out.append(self._compiled(x)), self.device)  # compiles
            self._check_compiled(out[0], eager)
            # Compiled against eager, interleaved at this moment (a busy machine's speed drifts
            # between the calibration and now): the speed-up the cache keeps for the next decision.
            runs = {"compiled": lambda: self._compiled(x), "eager": lambda: self.model(x)}
            with autocast():
                timed = tuning.best_seconds(runs, self.device, rounds=3)
        except Exception as exc:
            self._drop_compiled(exc)
            return
        seconds = max(0.0, first - timed["compiled"])
        self.compile_seconds += seconds
        self._compiled_rows.add(rows)
        self._call_size = rows
        speedup = timed["eager"] / timed["compiled"]
        info = self.tuning.setdefault("compile", {"decision": "on", "why": "compile=on"})
        info.update(compile_seconds=self.compile_seconds, speedup=speedup, cache_dir=self._compiled.cache_dir)
        key = self._compile_key(shape, batch_size)
        cache = tuning.TuningCache()
        entry = cache.get(key)
        cache.update(key, compile_seconds=(list(entry.get("compile_seconds") or []) + [seconds])[-5:],
                     speedups=(list(entry.get("speedups") or []) + [speedup])[-5:],
                     eager_seconds_per_copy=(list(entry.get("eager_seconds_per_copy") or [])
                                             + [timed["eager"] / rows])[-5:])

    @staticmethod
    def _check_compiled(compiled: torch.Tensor, eager: torch.Tensor) -> None:
        """The compiled forward must compute the model: finite where eager is, and within 25 % in
        relative norm (bf16 autocast differs by a few %; a miscompilation by far more)."""
        if not isinstance(compiled, torch.Tensor) or compiled.shape != eager.shape:
            raise RuntimeError("the compiled model's output differs in shape from the eager model's")
        c, e = compiled.float(), eager.float()
        if bool(torch.isfinite(e).all()) and not bool(torch.isfinite(c).all()):
            raise RuntimeError("the compiled model produced non-finite logits where the eager model did not")
        err = float((c - e).norm() / e.norm().clamp(min=1e-30))
        if err > 0.25:
            raise RuntimeError(f"the compiled model's logits differ from the eager model's by {err:.2g} in relative norm")

    def _drop_compiled(self, exc: BaseException) -> None:
        """Compilation failed: one line on standard error (no traceback), eager from now on."""
        tuning.report_compile_failure(exc)
        self._compiled, self._compiled_rows, self.compile = None, set(), False
        self._fallbacks += 1
        self._graphs.clear()
        info = self.tuning.setdefault("compile", {})
        info.update(decision="off", failed=tuning.compile_failure_line(exc))

    @contextlib.contextmanager
    def threads_for_call(self):
        """Within: the intra-op threads of one engine call (threads="auto": cpu.choose_threads by
        the load other processes put on the cores; restored afterwards)."""
        if self.device.type != "cpu":
            yield
            return
        before = torch.get_num_threads()
        if not self._in_call:
            self._thread_ceiling = before
        if self.threads == "auto":
            n = before  # one thread (the test suite's) leaves nothing to choose: no look at the load
            if self._load is not None and before > 1:
                n = choose_threads(usable_cores(), self._load.others_busy(), before)
        else:
            n = int(self.threads)
        self.tuning["threads"] = n
        if n != before:
            torch.set_num_threads(n)
        outer, self._in_call = self._in_call, True
        try:
            yield
        finally:
            self._in_call = outer
            if n != before:
                torch.set_num_threads(before)

    @property
    def precision(self) -> str:
        if self.dtype is None:
            return "auto"
        return {v: k for k, v in PRECISIONS.items()}[self.dtype]

    def tv_bound(self, dim: int) -> float:
        """tau: total-variation distance of one copy's noise (on the grid: of its nu) from the ideal
        law, from what the backend draws (DESIGN §5)."""
        return self.backend.tv_bound(self.noise, dim, self.input_grid)

    def _batch_buffer(self, batch_size: int, shape) -> torch.Tensor:
        # A compiled model is called on windows of exactly _call_rows rows (one static shape): the
        # buffer is rounded up to a multiple of it, and zeroed, so that a short last window reads
        # finite padding rows (their logits are dropped).
        rows = batch_size
        if self._compiled is not None:
            rows = -(-batch_size // self._call_size) * self._call_size
        buf = self._buffer
        if buf is None or buf.shape[0] < rows or tuple(buf.shape[1:]) != tuple(shape):
            buf = torch.zeros((rows, *shape), dtype=self.dtype, device=self.device)
            if self.channels_last and buf.dim() == 4:
                buf = buf.to(memory_format=torch.channels_last)
            self._buffer = buf
            self._graphs.clear()  # graphs of the old buffer: free their memory pools
        return buf[:batch_size]

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        amp = self.dtype != torch.float32
        # cache_enabled=False: autocast's weight-cast cache cannot live across CUDA-graph replays.
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=amp, cache_enabled=False):
            logits = None
            if self._compiled is not None:
                try:
                    logits = self._compiled_forward(batch)
                except Exception as exc:
                    logits = self._eager_forward(batch)  # the model's own error, if it is the model's fault
                    self._drop_compiled(exc)
            if logits is None:
                logits = self._eager_forward(batch)
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}; expected "
                             f"(batch, {self.num_classes}) for num_classes={self.num_classes}")
        return logits

    def _eager_forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.micro_batch and batch.shape[0] > self.micro_batch:
            return torch.cat([self.model(part) for part in batch.split(self.micro_batch)])
        return self.model(batch)

    def _compiled_forward(self, batch: torch.Tensor) -> torch.Tensor:
        """The compiled model on windows of exactly the compiled call size: over the padded batch
        buffer when ``batch`` is its head, else over a zero-padded copy."""
        rows, m = batch.shape[0], self._call_size
        if rows == m:
            return self._compiled(batch)
        padded = -(-rows // m) * m
        buf = self._buffer
        if (buf is not None and batch.data_ptr() == buf.data_ptr() and buf.shape[0] >= padded
                and batch.stride() == buf.stride()):
            src = buf[:padded]
        else:
            src = torch.zeros((padded, *batch.shape[1:]), dtype=batch.dtype, device=batch.device)
            if batch.dim() == 4 and self.channels_last:
                src = src.to(memory_format=torch.channels_last)
            src[:rows].copy_(batch)
        logits = torch.cat([self._compiled(src[i:i + m]) for i in range(0, padded, m)])
        return logits[:rows]

    def _graphed_forward(self, batch: torch.Tensor) -> torch.Tensor:
        """The forward of a full batch through a CUDA graph captured on first use."""
        key = (batch.data_ptr(), tuple(batch.shape))
        if key not in self._graphs:
            try:
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(2):  # warm-up outside the graph (cuDNN autotuning, lazy init)
                        self._forward(batch)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    logits = self._forward(batch)
                self._graphs[key] = (graph, logits)
            except RuntimeError as exc:  # a model with host syncs or dynamic shapes: stay eager
                import warnings
                warnings.warn(f"CUDA graph capture failed, running eagerly: {exc}")
                self.cuda_graph, self._graphs = False, {}
                return self._forward(batch)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits

    def _batches(self, jobs: Sequence[Job], batch_size: int):
        """Yield (rows, segments) covering every job's copies in order, ``batch_size`` rows at a time."""
        segments, row = [], 0
        for slot, job in enumerate(jobs):
            copy, left = job.first_copy, job.count
            while left:
                take = min(left, batch_size - row)
                segments.append(Segment(slot, job.image_index, copy, take, row))
                copy, left, row = copy + take, left - take, row + take
                if row == batch_size:
                    yield row, segments
                    segments, row = [], 0
        if row:
            yield row, segments

    def _row_slots(self, segments: Sequence[Segment], rows: int) -> torch.Tensor:
        """The packed-image slot of every row of a batch, written on the device by one fill per
        segment: no host-to-device copy, hence no host sync."""
        if self._slots is None or self._slots.shape[0] < rows:
            self._slots = torch.empty(max(rows, 1), dtype=torch.int64, device=self.device)
        for seg in segments:
            self._slots[seg.row:seg.row + seg.count].fill_(seg.slot)
        return self._slots[:rows]

    def run(self, jobs: Sequence[Job], batch_size=1000, soft: bool = False) -> torch.Tensor:
        """Per-job totals on the CPU: int64 vote counts (M, K), or float64 softmax sums with soft=True."""
        return self.submit(jobs, batch_size, soft).result()

    @torch.inference_mode()
    def submit(self, jobs: Sequence[Job], batch_size=1000, soft: bool = False) -> "PendingTotals":
        """Queue the work of ``run`` and return at once where the device runs asynchronously (CUDA):
        the totals come back through ``result()``. No step of it waits for the device: the images go
        up from pinned memory, the counts stay on the device and come down by one asynchronous copy.
        batch_size="auto": ``batch_size_for`` the images' shape."""
        if jobs and isinstance(batch_size, str) and batch_size == "auto":
            batch_size = self.batch_size_for(tuple(jobs[0].x.shape))
        with self.threads_for_call():
            return self._submit(jobs, batch_size, soft)

    def _submit(self, jobs: Sequence[Job], batch_size, soft: bool) -> "PendingTotals":
        if isinstance(batch_size, str) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not jobs:
            return PendingTotals(torch.zeros((0, self.num_classes), dtype=torch.float64 if soft else torch.int64))
        shape = tuple(jobs[0].x.shape)
        self._prepare(shape, int(batch_size), sum(max(0, job.count) for job in jobs))
        fallbacks = self._fallbacks
        for job in jobs:
            if tuple(job.x.shape) != shape:
                raise ValueError(f"all images of one call must share a shape; got {shape} and {tuple(job.x.shape)}")
            if job.count < 0 or job.first_copy < 0:
                raise ValueError("copy ranges must be non-negative")
        xs = self._upload([job.x for job in jobs])
        totals = torch.zeros((len(jobs), self.num_classes), device=self.device,
                             dtype=torch.float64 if soft else torch.int64)
        nonfinite = torch.zeros(1, dtype=torch.int64, device=self.device)
        buf = self._batch_buffer(min(int(batch_size), sum(j.count for j in jobs)) or 1, shape)
        for rows, segments in self._batches(jobs, int(batch_size)):
            batch = buf[:rows]
            self.backend.fill(batch, xs, segments, self.noise, self.seed, self.input_grid, DOMAIN_CERTIFY)
            full = rows == buf.shape[0]
            logits = self._graphed_forward(batch) if self.cuda_graph and full else self._forward(batch)
            slots = self._row_slots(segments, rows)
            if soft:
                finite = torch.isfinite(logits).all(dim=1)
                nonfinite += (~finite).sum()
                probs = torch.softmax(logits.float(), dim=1).double() * finite[:, None]
                totals.index_add_(0, slots, torch.nan_to_num(probs))
            else:
                self.backend.vote(logits, slots, totals, nonfinite)
        if self._fallbacks != fallbacks:
            # The compiled model failed within this call (a recompile): its votes came from two
            # classifiers. Counted again, all by the eager model, they come from one.
            return self._submit(jobs, batch_size, soft)
        if self.device.type != "cuda":
            return PendingTotals(totals.cpu(), nonfinite.cpu())
        host = [self._download(t) for t in (totals, nonfinite)]
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))  # this sampler's device, maybe not the current one
        return PendingTotals(*host, done)

    def _upload(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """The images stacked on the device: float32 pixels, or int32 grid indices with input_grid
        (grid.grid_indices: off-grid inputs are refused). From the host to a GPU through pinned
        memory: a copy from pageable memory would make the host wait for all the work queued there."""
        if self.input_grid is not None:
            images = [grid_indices(x, self.input_grid) for x in images]
        else:
            images = [x.to(torch.float32) for x in images]
        if self.device.type == "cuda" and all(x.device.type == "cpu" for x in images):
            return torch.stack(images).pin_memory().to(self.device, non_blocking=True)
        return torch.stack([x.to(self.device) for x in images])

    @staticmethod
    def _download(t: torch.Tensor) -> torch.Tensor:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)


class PendingTotals:
    """The totals of ``Sampler.submit``; on CUDA their copy to the host may still be in flight until
    ``event`` (recorded after that copy) completes."""

    def __init__(self, totals: torch.Tensor, nonfinite: Optional[torch.Tensor] = None,
                 event: Optional["torch.cuda.Event"] = None):
        self._totals, self._nonfinite, self._event = totals, nonfinite, event

    def result(self) -> torch.Tensor:
        """Wait for the device (the one host sync of the call); the totals on the CPU."""
        if self._event is not None:
            self._event.synchronize()
        bad = 0 if self._nonfinite is None else int(self._nonfinite.item())
        if bad:
            raise NonFiniteLogitsError(
                f"the model returned NaN or inf logits for {bad} noisy copies; a non-finite output "
                "cannot be counted as a vote (check the model, its input range and the precision)")
        return self._totals
