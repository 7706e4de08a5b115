"""`fastsmooth bench`: certify throughput against the reference loop and the bare model forward.

DESIGN §6: the floor is the bare model forward; the yardstick is Cohen et al.'s sampling loop. For
one model and one number of noisy copies, three methods run side by side, interleaved round by
round in one process:

* reference  — Cohen et al.'s ``Smooth._sample_noise`` (core.py), written out here: for every batch
  ``x.repeat``, ``randn_like * sigma``, float32 forward of the model as given (NCHW), argmax, copy
  to the host and count in numpy; CERTIFY runs it for the n0 selection copies, then for n.
* bare       — the model forward alone in the engine's configuration (its model object, precision,
  channels_last, batch size, a batch buffer like the engine's): no noise, no votes, no statistics.
* fastsmooth — ``Smooth.certify_many`` over the same images with the same n0 and n.

Throughput is noisy copies per second; the ratios are reference / fastsmooth (the speed-up, higher is
better) and fastsmooth / bare (the engine's overhead over the floor, 1.0 is perfect). Each method's
figure is from its best round (least disturbed by other processes); medians are recorded too, and the
paired ratios: the median over rounds of the ratio of two runs made in the same round.

The measurement code lives here and only here: bench/ (pytest-benchmark) imports it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .cli import batch_arg, input_grid_arg
from .noises import Gaussian
from .telemetry import device_facts, summary

METHODS = ("reference", "bare", "fastsmooth")
LABELS = {"reference": "reference loop (Cohen et al.)", "bare": "bare model forward",
          "fastsmooth": "fastsmooth certify"}
EMBEDDED = "embedded"
COHEN_BATCH = 1000              # certify.py's --batch default
TARGET_OVERHEAD = 1.10          # fastsmooth / bare at most this (issue 4)
# reference / fastsmooth at least this: issue 4 for GPUs; issue 15 for CPUs, by kind (with the
# compiled default): 8x where the CPU has bf16 units (AMX / AVX512-BF16), 1.8x on an AVX2-only CPU.
TARGET_SPEEDUP = {"cuda": 10.0, "cpu-bf16": 8.0, "cpu": 1.8}


def target_speedup(device_type: str) -> float:
    if device_type == "cpu":
        from .cpu import has_bf16_units

        return TARGET_SPEEDUP["cpu-bf16" if has_bf16_units() else "cpu"]
    return TARGET_SPEEDUP.get(device_type, TARGET_SPEEDUP["cuda"])


# -- the workload -------------------------------------------------------------------------------

@dataclass
class Workload:
    """One model and one amount of work: ``images`` images, each certified with n0 + n copies."""

    name: str
    model: nn.Module
    num_classes: int
    shape: Tuple[int, ...]
    n0: int = 100
    n: int = 2_000
    images: int = 1
    batch: object = 1000  # or "auto": the engine's batch_size_for (1000 on a CPU; fills a GPU)
    sigma: float = 0.25
    precision: str = "auto"
    backend: str = "auto"
    compile: str = "auto"
    device: Optional[str] = None
    seed: int = 0
    alpha: float = 0.001
    input_grid: Optional[int] = 255       # the images are 8-bit (k / 255), as the built-in data sets
    # The run the figures stand for: the engine is told its work (compile="auto" decides by it, as
    # `fastsmooth certify` would for that run), and the record estimates its whole time from the
    # measured rates, compilation included. Default: 10 images at n = 100,000.
    whole_run: Tuple[int, int] = (10, 100_000)

    @property
    def copies(self) -> int:
        return self.images * (self.n0 + self.n)

    @property
    def whole_run_copies(self) -> int:
        images, n = self.whole_run
        return images * (self.n0 + n)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_model(arch: str, dataset: Optional[str] = None, sigma: float = 0.25, device=None,
               checkpoint: Optional[str] = None) -> Tuple[nn.Module, int, Tuple[int, ...], str]:
    """(model, num_classes, input shape CHW, name) for a checkpoint, the user's own model
    (``checkpoint="MODULE:FACTORY"``, with ``dataset`` fixing its input size and classes), a named
    architecture with random weights, or ``arch="embedded"``: the embedded default model trained with
    Gaussian(sigma)."""
    from . import data, models

    def fixed_size(name: str):
        info = data.get_info(name)
        if info.shape is None or info.num_classes is None:
            raise ValueError(f"dataset {info.name!r} fixes no input size or class count; use a fixed-size dataset")
        return info

    if checkpoint is not None and models.is_factory_spec(checkpoint):
        if dataset is None:
            raise ValueError(f"--model {checkpoint} needs --dataset: it fixes the input size and the classes")
        info = fixed_size(dataset)
        model = models.load_factory(checkpoint).eval()
        return model, int(info.num_classes), tuple(info.shape), f"{checkpoint} ({info.name})"
    if checkpoint is not None:
        model, meta = models.load_checkpoint(checkpoint, dataset=dataset, device="cpu")
        info = data.get_info(meta["dataset"])
        shape = tuple(meta.get("input_shape") or info.shape or ())
        if not shape:
            raise ValueError(f"{checkpoint}: the input size is not fixed by dataset {info.name!r}; "
                             "give the checkpoint an 'input_shape' entry")
        return model, int(meta["num_classes"]), shape, f"{os.path.basename(checkpoint)} ({meta['arch']}, {info.name})"
    if arch == EMBEDDED:
        from . import embedded

        dataset = dataset or "mnist"
        model = embedded.default_model(Gaussian(sigma=sigma), device=device, progress=False)
        info = data.get_info(dataset)
        return model, int(info.num_classes), tuple(info.shape), f"embedded default model ({info.name})"
    info = fixed_size(dataset or ("imagenet" if arch == "resnet50" else "cifar10"))
    with torch.random.fork_rng(devices=[]):  # random weights, the same every run; caller's RNG untouched
        torch.manual_seed(0)
        model = models.get_architecture(arch, info).eval()
    return model, int(info.num_classes), tuple(info.shape), f"{arch} ({info.name}, random weights)"


# -- the three methods -------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def cohen_count_arr(arr: np.ndarray, length: int) -> np.ndarray:
    """Cohen et al.'s ``Smooth._count_arr``, as written in core.py."""
    counts = np.zeros(length, dtype=int)
    for idx in arr:
        counts[idx] += 1
    return counts


def cohen_sample_noise(model: nn.Module, x: torch.Tensor, sigma: float, num: int, batch_size: int,
                       num_classes: int) -> np.ndarray:
    """Cohen et al.'s ``Smooth._sample_noise`` (core.py), with ``x`` already on the model's device."""
    with torch.no_grad():
        counts = np.zeros(num_classes, dtype=int)
        for _ in range(math.ceil(num / batch_size)):
            this_batch_size = min(batch_size, num)
            num -= this_batch_size
            batch = x.repeat((this_batch_size, 1, 1, 1))
            noise = torch.randn_like(batch, device=x.device) * sigma
            predictions = model(batch + noise).argmax(1)
            counts += cohen_count_arr(predictions.cpu().numpy(), num_classes)
        return counts


class Runners:
    """The three methods on one workload, each a zero-argument callable doing ``workload.copies``
    noisy copies (bare: forwards) and returning when the device is done."""

    def __init__(self, w: Workload):
        from .smooth import Smooth

        self.workload = w
        self.device = torch.device(w.device) if w.device is not None else default_device()
        gen = torch.Generator().manual_seed(w.seed)
        # 8-bit images (k / 255), as the data sets certify (on the grid of input_grid = 255)
        self.images = (torch.randint(0, 256, (w.images, *w.shape), generator=gen) / 255.0).to(self.device)
        # Cohen's loop gets the model as the user gave it (fp32, its own memory format); the engine
        # may convert its model in place (channels_last), so the reference runs on a copy.
        self.reference_model = copy.deepcopy(w.model).to(self.device).float().eval()
        self.noise = Gaussian(sigma=w.sigma)
        self.smooth = Smooth(w.model, w.num_classes, self.noise, backend=w.backend, precision=w.precision,
                             seed=w.seed, device=self.device, compile=w.compile, input_grid=w.input_grid)
        s = self.smooth.sampler
        self.smooth.expect(w.whole_run_copies)
        # Resolve the "auto" choices (and compile, if that pays for the whole run) before the buffer
        # is made and the configuration read: the compile time is kept apart from every round.
        # The engine's batch ("auto": what certify would take); Cohen's loop keeps Cohen's default.
        self.batch = s.batch_size_for(tuple(w.shape)) if w.batch == "auto" else int(w.batch)
        self.reference_batch = COHEN_BATCH if w.batch == "auto" else int(w.batch)
        s.prepare(tuple(w.shape), self.batch)
        self.engine = dict(self.smooth.metadata)
        # The bare forward runs through the engine's own forward path on the engine's own batch
        # buffer (so a CUDA graph captured over that buffer serves both), filled once with noisy
        # copies so that the model sees realistic values; later certify calls refill it likewise.
        rows = min(self.batch, max(w.copies, 1))
        buf = s._batch_buffer(rows, tuple(w.shape))
        with torch.inference_mode():
            s.backend.fill(buf, s._upload([self.images[0]]), [(0, 0, 0, rows, 0)], self.noise, w.seed, s.input_grid)
        self.buffer = buf

    def _engine_forward(self, batch: torch.Tensor) -> torch.Tensor:
        """The engine's forward of one batch: CUDA-graph replay for full batches where the engine
        uses it, else its eager forward (autocast to its precision, micro-batches)."""
        s = self.smooth.sampler
        if s.cuda_graph and batch.shape[0] == self.buffer.shape[0]:
            return s._graphed_forward(batch)
        return s._forward(batch)

    # Each method -------------------------------------------------------------------------------
    def reference(self):
        w = self.workload
        out = []
        # On the engine's intra-op threads for this moment (on a busy CPU fewer than torch's
        # default): side by side, the methods get the same cores.
        with self.smooth.sampler.threads_for_call():
            for x in self.images:  # Cohen's certify: n0 selection copies, then n estimation copies
                out.append(cohen_sample_noise(self.reference_model, x, w.sigma, w.n0, self.reference_batch, w.num_classes))
                out.append(cohen_sample_noise(self.reference_model, x, w.sigma, w.n, self.reference_batch, w.num_classes))
        return out

    def bare(self):
        s, w = self.smooth.sampler, self.workload
        self.buffer = s._batch_buffer(self.buffer.shape[0], tuple(w.shape))  # it may have been remade
        left = w.copies
        with torch.inference_mode(), s.threads_for_call():
            while left:
                rows = min(left, self.buffer.shape[0])
                self._engine_forward(self.buffer[:rows])
                left -= rows
        _sync(self.device)

    def fastsmooth(self):
        w = self.workload
        certs = list(self.smooth.certify_many(((i, x) for i, x in enumerate(self.images)), n0=w.n0, n=w.n,
                                              alpha=w.alpha, batch_size=self.batch))
        _sync(self.device)
        return certs

    def method(self, name: str) -> Callable[[], object]:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
        return getattr(self, name)

    def describe(self, name: str) -> str:
        """The configuration a method runs in, for the table."""
        e = self.engine
        if name == "reference":
            return f"fp32, {_memory_format(self.reference_model)}, batch {self.reference_batch}"
        layout = "channels_last" if e.get("channels_last") else "NCHW"
        graph = ", CUDA graph" if self.smooth.sampler.cuda_graph else ""
        micro = f" in {e['micro_batch']}s" if e.get("micro_batch") else ""
        compiled = ", compiled" if self.smooth.sampler.compile else ""
        base = f"{e.get('precision')}, {layout}, batch {self.batch}{micro}{compiled}{graph}"
        return base if name == "bare" else f"{base}, {e.get('backend')} backend"


def _memory_format(model: nn.Module) -> str:
    for p in model.parameters():
        if p.dim() == 4:
            return "channels_last" if p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() else "NCHW"
    return "NCHW"


# -- measurement --------------------------------------------------------------------------------

@dataclass
class Measurement:
    """Timings of the methods of one ``Runners``, round by round, on one clock (perf_counter, device
    synchronized). ``run(name)`` times one call and records it; the first call of each method is a
    warm-up (kernel selection, oneDNN primitives, allocator) and is kept apart."""

    runners: Runners
    seconds: Dict[str, List[float]] = field(default_factory=dict)
    cpu_seconds: Dict[str, List[float]] = field(default_factory=dict)
    warmup_seconds: Dict[str, float] = field(default_factory=dict)

    def run(self, name: str) -> float:
        """Time one call of method ``name``: wall seconds (returned and recorded) and this process's
        CPU seconds (recorded: on a shared CPU less disturbed by other processes than wall time)."""
        fn = self.runners.method(name)
        _sync(self.runners.device)
        cpu, start = time.process_time(), time.perf_counter()
        fn()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        if name not in self.warmup_seconds:
            self.warmup_seconds[name] = elapsed
        else:
            self.seconds.setdefault(name, []).append(elapsed)
            self.cpu_seconds.setdefault(name, []).append(cpu)
        return elapsed

    def warmup(self, methods: Sequence[str] = METHODS) -> None:
        for name in methods:
            if name not in self.warmup_seconds:
                self.run(name)

    def rounds(self, count: int, methods: Sequence[str] = METHODS) -> None:
        """``count`` measured rounds, the methods interleaved within each round, in reverse order every
        other round (no method always runs first, or right after another)."""
        self.warmup(methods)
        for i in range(count):
            for name in (methods if i % 2 == 0 else list(reversed(methods))):
                self.run(name)

    # Results ----------------------------------------------------------------------------------
    def best(self, name: str) -> Optional[float]:
        times = self.seconds.get(name)
        return min(times) if times else None

    def copies_per_s(self, name: str, how: str = "best") -> Optional[float]:
        times = self.seconds.get(name)
        if not times:
            return None
        t = min(times) if how == "best" else statistics.median(times)
        return self.runners.workload.copies / t

    def ratios(self, how: str = "best") -> Dict[str, Optional[float]]:
        """The two ratios from each method's best or median round, or "paired": the median over
        rounds of the ratio within a round. On a shared CPU, whose speed drifts over seconds, the
        paired ratio compares runs made seconds apart, so the drift cancels."""
        pairs = {"reference_over_fastsmooth": ("reference", "fastsmooth"),
                 "fastsmooth_over_bare": ("fastsmooth", "bare")}
        out = {}
        for key, (a, b) in pairs.items():
            ta, tb = self.seconds.get(a), self.seconds.get(b)
            if not ta or not tb:
                out[key] = None
            elif how == "paired":
                out[key] = statistics.median(x / y for x, y in zip(ta, tb))
            else:
                pick = min if how == "best" else statistics.median
                out[key] = pick(ta) / pick(tb)
        return out

    def whole_run(self) -> dict:
        """The workload's whole run (default 10 images at n = 100,000) estimated from the median
        rates: fastsmooth's compile time + its copies at certify's rate, against the reference loop."""
        w, s = self.runners.workload, self.runners.smooth.sampler
        images, n = w.whole_run
        copies = w.whole_run_copies
        fs, ref = self.copies_per_s("fastsmooth", "median"), self.copies_per_s("reference", "median")
        fs_s = s.compile_seconds + copies / fs if fs else None
        ref_s = copies / ref if ref else None
        return {"images": images, "n": n, "copies": copies, "compile": bool(s.compile),
                "compile_seconds": s.compile_seconds, "fastsmooth_seconds": fs_s, "reference_seconds": ref_s,
                "reference_over_fastsmooth": ref_s / fs_s if fs_s and ref_s else None,
                "compile_decision": (s.tuning.get("compile") or {}).get("decision")}

    def record(self, facts: Optional[dict] = None) -> dict:
        """A json-able record: workload, engine configuration, copies/s, ratios, raw timings, facts."""
        w, r = self.runners.workload, self.runners
        best, median, paired = self.ratios("best"), self.ratios("median"), self.ratios("paired")
        rec = {
            "model": w.name, "input_shape": list(w.shape), "num_classes": w.num_classes,
            "copies": w.copies, "images": w.images, "n0": w.n0, "n": w.n, "batch": r.batch,
            "reference_batch": r.reference_batch, "sigma": w.sigma,
            "engine": r.engine,
            "configs": {m: r.describe(m) for m in METHODS},
            "copies_per_s": {m: self.copies_per_s(m) for m in METHODS},
            "copies_per_s_median": {m: self.copies_per_s(m, "median") for m in METHODS},
            **best,
            "ratios_median": median,
            "ratios_paired": paired,
            "seconds": {m: list(v) for m, v in self.seconds.items()},
            "cpu_seconds": {m: list(v) for m, v in self.cpu_seconds.items()},
            "warmup_seconds": dict(self.warmup_seconds),
            # torch.compile's one-time cost, paid before the first round (Runners)
            "compile_seconds": r.smooth.sampler.compile_seconds,
            "whole_run": self.whole_run(),
        }
        rec["device_facts"] = facts if facts is not None else device_facts(r.device)
        return rec


class EngineProfile:
    """Where certify's time goes: wraps the engine's fill / forward / vote for the duration of a
    ``with`` block and accumulates their wall time (device-synchronized around each call, so on CUDA
    it removes the overlap it measures: a breakdown, not a throughput). ``other`` is the rest of the
    certify call: batching, slots, statistics, the host reads."""

    PARTS = ("fill", "forward", "vote")

    def __init__(self, runners: Runners):
        self.runners = runners
        self.seconds = {p: 0.0 for p in self.PARTS}
        self.calls = {p: 0 for p in self.PARTS}
        self.total = 0.0
        self._depth = {p: 0 for p in self.PARTS}
        self._saved = []

    def _wrap(self, obj, attr: str, part: str) -> None:
        fn = getattr(obj, attr, None)
        if fn is None:
            return
        device = self.runners.device

        def timed(*args, **kwargs):
            # Only the outermost call of a part is timed (the graphed forward calls the eager one
            # while capturing), and nothing is synchronized while a CUDA graph is being captured.
            outer = self._depth[part] == 0 and not _capturing(device)
            self._depth[part] += 1
            try:
                if outer:
                    _sync(device)
                    start = time.perf_counter()
                out = fn(*args, **kwargs)
                if outer:
                    _sync(device)
                    self.seconds[part] += time.perf_counter() - start
                    self.calls[part] += 1
            finally:
                self._depth[part] -= 1
            return out

        self._saved.append((obj, attr, obj.__dict__.get(attr, _MISSING)))
        setattr(obj, attr, timed)

    def __enter__(self):
        s = self.runners.smooth.sampler
        self._wrap(s.backend, "fill", "fill")
        self._wrap(s, "_forward", "forward")
        self._wrap(s, "_graphed_forward", "forward")
        self._wrap(s.backend, "vote", "vote")
        return self

    def __exit__(self, *exc):
        for obj, attr, old in reversed(self._saved):
            if old is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)
        self._saved.clear()
        return False

    def run(self, rounds: int = 1) -> "EngineProfile":
        """Time ``rounds`` certify calls (after the caller's warm-up) under the wrappers."""
        with self:
            for _ in range(rounds):
                start = time.perf_counter()
                self.runners.fastsmooth()
                self.total += time.perf_counter() - start
        return self

    def breakdown(self) -> dict:
        other = max(0.0, self.total - sum(self.seconds.values()))
        return {"total_s": self.total, **{f"{p}_s": self.seconds[p] for p in self.PARTS}, "other_s": other,
                "calls": dict(self.calls)}

    def format(self) -> str:
        b, total = self.breakdown(), self.total or float("nan")
        parts = [f"{p} {b[p + '_s']:.3f} s ({100 * b[p + '_s'] / total:.1f}%, {self.calls[p]} calls)" for p in self.PARTS]
        parts.append(f"other {b['other_s']:.3f} s ({100 * b['other_s'] / total:.1f}%)")
        return f"certify {total:.3f} s = " + ", ".join(parts)


_MISSING = object()


def measure(workload: Workload, rounds: int = 3, methods: Sequence[str] = METHODS) -> Measurement:
    m = Measurement(Runners(workload))
    m.rounds(rounds, methods)
    return m


# -- the table ----------------------------------------------------------------------------------

def _fmt(value: Optional[float], spec: str) -> str:
    if value is None:
        digits = "".join(ch for ch in spec.split(".")[0].split(",")[0] if ch.isdigit())
        return "-".rjust(int(digits) if digits else 1)
    return format(value, spec)


def format_table(record: dict) -> str:
    """The human table of one record (see ``Measurement.record``)."""
    facts = record.get("device_facts") or {}
    e = record["engine"]
    width = max(len("configuration"), *(len(c) for c in record["configs"].values()))
    lines = [
        f"machine : {summary(facts) if facts else '?'}",
        f"model   : {record['model']}, input {'x'.join(map(str, record['input_shape']))}, "
        f"{record['num_classes']} classes",
        f"work    : {record['copies']:,} noisy copies per method = {record['images']} image(s) x "
        f"(n0 {record['n0']} + n {record['n']:,}), batch {record['batch']}, Gaussian sigma {record['sigma']}",
        f"engine  : backend {e.get('backend')}, precision {e.get('precision')}, channels_last "
        f"{e.get('channels_last')}, device {e.get('device')}"
        + (f", threads {e['tuning']['threads']}" if "threads" in (e.get("tuning") or {}) else "")
        + (f", torch.compile (one-time cost {record.get('compile_seconds', 0):.1f} s, before the rounds)"
           if e.get("compile") else ", eager (not compiled)"),
        "",
        f"{'method':<30} {'configuration':<{width}} {'best s':>9} {'copies/s':>11} {'median copies/s':>16}",
    ]
    for m in METHODS:
        times = record["seconds"].get(m) or []
        lines.append(f"{LABELS[m]:<30} {record['configs'][m]:<{width}} {_fmt(min(times) if times else None, '9.3f')} "
                     f"{_fmt(record['copies_per_s'][m], '11,.0f')} {_fmt(record['copies_per_s_median'][m], '16,.0f')}")
    device_type = (e.get("device") or "cpu").split(":")[0]
    speed, over = record["reference_over_fastsmooth"], record["fastsmooth_over_bare"]
    med, paired = record["ratios_median"], record.get("ratios_paired") or {}
    lines += [
        "",
        f"reference / fastsmooth = {_fmt(speed, '.2f')}x (median {_fmt(med['reference_over_fastsmooth'], '.2f')}x, "
        f"paired {_fmt(paired.get('reference_over_fastsmooth'), '.2f')}x; "
        f"target >= {target_speedup(device_type):g}x)",
        f"fastsmooth / bare      = {_fmt(over, '.3f')}x (median {_fmt(med['fastsmooth_over_bare'], '.3f')}x, "
        f"paired {_fmt(paired.get('fastsmooth_over_bare'), '.3f')}x; target <= {TARGET_OVERHEAD:.2f}x)",
    ]
    whole = record.get("whole_run")
    if whole:
        fs, ref = whole.get("fastsmooth_seconds"), whole.get("reference_seconds")
        compiled = (f"{whole['compile_seconds']:.1f} s compiling + " if whole.get("compile") else "eager, ")
        lines.append(
            f"whole run ({whole['images']} images, n = {whole['n']:,}; from the median rates): fastsmooth "
            f"{_fmt(fs, ',.0f')} s ({compiled}certify), reference {_fmt(ref, ',.0f')} s: "
            f"{_fmt(whole.get('reference_over_fastsmooth'), '.2f')}x")
    return "\n".join(lines)


# -- `fastsmooth bench` ---------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Certify throughput (noisy copies/s) of fastsmooth against Cohen et al.'s "
                          "reference loop and the bare model forward, for one model.")
    parser.add_argument("--model", default=None,
                        help="checkpoint {'arch','state_dict'}, or MODULE:FACTORY for your own torch.nn.Module "
                             "(FACTORY() returns it; give --dataset) (default: --arch with random weights)")
    parser.add_argument("--dataset", default=None, help="data set fixing input size and classes "
                        "(default: the checkpoint's; cifar10 for CIFAR architectures; mnist for embedded)")
    parser.add_argument("--arch", default="cifar_resnet20",
                        help="architecture with random weights when no --model is given, or 'embedded' for "
                             "the embedded default model (default cifar_resnet20)")
    parser.add_argument("--copies", type=int, default=None,
                        help="estimation copies n per image (default 100000 on CUDA, 2000 on CPU)")
    parser.add_argument("--n0", type=int, default=100, help="selection copies per image (default 100)")
    parser.add_argument("--images", type=int, default=1, help="images certified per measurement (default 1)")
    parser.add_argument("--batch", type=batch_arg, default="auto", help="the engine's copies per forward batch "
                        "(default auto, as certify: 1000 on a CPU, on a GPU the batch that fills it; the "
                        "reference loop then keeps Cohen's 1000)")
    parser.add_argument("--sigma", type=float, default=0.25, help="Gaussian noise level (default 0.25)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "native", "triton"])
    parser.add_argument("--input-grid", default="255", type=input_grid_arg, help="certify the 8-bit test images on "
                        "the grid 1/255 (default 255, as certify's auto for 8-bit data sets; auto is 255 here) or "
                        "in float arithmetic (none)")
    parser.add_argument("--compile", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                        help="torch.compile the engine's model (bare forward and certify): auto (default, as "
                             "certify decides for the --whole-run), on (also a bare --compile), off; the "
                             "reference loop stays eager, as Cohen et al. ran it")
    parser.add_argument("--whole-run", type=_whole_run, default=(10, 100_000), metavar="IMAGESxN",
                        help="the run the figures stand for (default 10x100000): the engine's compile "
                             "decision is made for its work, and its whole time is estimated, compile included")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds after one warm-up (default 3)")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference loop (slow on big models)")
    parser.add_argument("--profile", action="store_true",
                        help="then time the engine's parts (noise fill, forward, votes, other) over the rounds")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the record (with device facts) as JSON")
    parser.set_defaults(run=run)


def _whole_run(text: str) -> Tuple[int, int]:
    images, sep, n = text.lower().partition("x")
    if not sep or not images.isdigit() or not n.isdigit() or int(images) < 1 or int(n) < 1:
        raise argparse.ArgumentTypeError(f"expected IMAGESxN (e.g. 10x100000), got {text!r}")
    return int(images), int(n)


def run(args: argparse.Namespace) -> int:
    for name in ("copies", "n0", "images", "batch", "rounds"):
        value = getattr(args, name)
        if value == "auto":
            continue
        if value is not None and value <= 0:
            raise ValueError(f"--{name} must be > 0, got {value}")
    if args.sigma <= 0:
        raise ValueError(f"--sigma must be > 0, got {args.sigma}")
    device = torch.device(args.device) if args.device else default_device()
    copies = args.copies or (100_000 if device.type == "cuda" else 2_000)
    model, num_classes, shape, name = make_model(args.arch, args.dataset, args.sigma, device, args.model)
    workload = Workload(name, model, num_classes, shape, n0=args.n0, n=copies, images=args.images,
                        batch=args.batch, sigma=args.sigma, precision=args.precision, backend=args.backend,
                        compile=args.compile, device=str(device),
                        input_grid={"auto": 255, "none": None}.get(args.input_grid, args.input_grid),
                        whole_run=args.whole_run)
    methods = [m for m in METHODS if not (args.no_reference and m == "reference")]
    print(f"fastsmooth bench: {name}: 1 warm-up + {args.rounds} rounds of {', '.join(methods)} "
          f"({workload.copies:,} copies each)...", file=sys.stderr, flush=True)
    m = measure(workload, args.rounds, methods)
    record = m.record()
    print(format_table(record))
    if args.profile:
        prof = EngineProfile(m.runners).run(args.rounds)
        record["profile"] = prof.breakdown()
        print(f"\nprofile : {prof.format()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2, default=str)
    return 0
