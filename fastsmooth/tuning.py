"""The engine's choices by measurement: timed calibrations, the torch.compile decision, the compiled
model, and a cache of what was measured so that a second run pays little.

Every choice made here (precision, layout, batch, compile) changes the base classifier in its last
bits at most, and only in ways that are themselves deterministic functions of the input; but rows of
a run must not change when it is resumed or spread over processes, so the choices are recorded with
the results (``Smooth.metadata``) and a resumed or torchrun process reuses the recorded choices
instead of measuring again (cli.py). The cache only saves time: it is consulted for "auto" choices
of a fresh run, never for a recorded one.

Cache: ``cache.cache_dir() / "tuning.json"``, one entry per model shape and device (``fingerprint``):
the calibration timings, the measured compile times and the compiled forward's speed-up. The
inductor compile cache goes to ``cache.cache_dir() / "inductor"`` unless $TORCHINDUCTOR_CACHE_DIR
is set. With freezing, inductor's FX-graph cache is bypassed (torch 2.13: "fxgraph_cache_bypass"),
so a warm compile still traces the model; what it reuses are the compiled C++ / Triton kernels.
Measured here (2-core Xeon, ResNet-20 bf16, micro-batches of 128): 14.5 s cold, 3.5-7.5 s warm;
ResNet-110 22 s cold, 13.5 s warm.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Sequence

import torch
from torch import nn

from .cache import cache_dir
from .checks import first_line

COMPILE_CHOICES = ("auto", "on", "off")

# Before a model has been compiled on this machine, the compile decision assumes these. Measured
# here (2-core Xeon, torch 2.13, inductor with freezing): compile 5 s (small CNN) to 22 s
# (ResNet-110) with a cold cache; compiled / eager forward time 0.37-0.45 for ResNet-20 bf16, 0.5 for
# fp32, 0.6 for the embedded CNN. On CUDA nothing has been measured yet: a longer compile (Triton
# kernels, autotuning of convolutions) and a smaller gain are assumed. Once a model has compiled,
# the cache's measured figures replace both.
DEFAULT_COMPILE_SECONDS = {"cpu": (10.0, 0.05), "cuda": (30.0, 0.2)}  # (base, per module)
DEFAULT_SPEEDUP = {"cpu": 2.0, "cuda": 1.3}
# A compile must win at least this share of the announced work's eager forward time beyond its
# own cost: an estimate that is only just positive is not worth the risk of a slow compile.
COMPILE_MARGIN = 1.25
# bf16 is chosen over fp32 on a CPU only when it is clearly faster: a near tie changes the base
# classifier for nothing, and timing noise could flip it from run to run.
BF16_MIN_GAIN = 1.10


def parse_compile(value) -> str:
    """"auto", "on" or "off" from those strings or a bool (True = "on")."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str) and value.lower() in COMPILE_CHOICES:
        return value.lower()
    raise ValueError(f"compile must be 'auto', 'on', 'off' or a bool, got {value!r}")


# -- what a measurement is of ---------------------------------------------------------------------

def device_name(device: torch.device, threads: "int | None" = None) -> str:
    """The hardware behind ``device``: the CPU model and the intra-op threads available (``threads``,
    default torch.get_num_threads(); the engine passes the ceiling it chooses under, not the count
    of the moment, so that a key does not change with the load), or the GPU's name."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{torch.cuda.get_device_name(index)}"
    from .cpu import cpu_model

    return f"cpu:{cpu_model()}:threads={threads if threads is not None else torch.get_num_threads()}"


def fingerprint(model: nn.Module, shape: Sequence[int], device: torch.device, what: str,
                threads: "int | None" = None) -> str:
    """A key for the measurements of ``what`` on this model shape (its module types and tensor
    shapes, not its weights), input shape, device (device_name) and torch version."""
    h = hashlib.sha256()
    for name, module in model.named_modules():
        h.update(f"{name}:{type(module).__qualname__};".encode())
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    h.update(f"{tuple(shape)}|{device_name(device, threads)}|torch {torch.__version__}|{what}".encode())
    return h.hexdigest()[:32]


def weights_signature(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or modified in place (its version
    counter): a frozen compiled model holds copies of the weights and must then be rebuilt."""
    return tuple((t.data_ptr(), t._version) for t in itertools.chain(model.parameters(), model.buffers()))


# -- the cache ------------------------------------------------------------------------------------

class TuningCache:
    """A small JSON file of measurements, keyed by ``fingerprint``; reads and writes never fail a run
    (an unreadable or unwritable cache is treated as empty)."""

    def __init__(self, path=None):
        self.path = path if path is not None else cache_dir() / "tuning.json"

    def _read(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> dict:
        entry = self._read().get(key)
        return entry if isinstance(entry, dict) else {}

    def update(self, key: str, **values) -> None:
        try:
            from filelock import FileLock

            os.makedirs(os.path.dirname(str(self.path)), exist_ok=True)
            with FileLock(str(self.path) + ".lock", timeout=10):
                data = self._read()
                entry = data.get(key) if isinstance(data.get(key), dict) else {}
                entry.update(values)
                data[key] = entry
                tmp = f"{self.path}.{os.getpid()}.tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
        except Exception:  # a cache is a convenience: never fail a run for it
            pass


# -- timing ---------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe_batch(rows: int, shape, device, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """A batch of inputs like the engine's (image + Gaussian noise, fixed seed); never zeros, which
    can run faster than real data."""
    gen = torch.Generator().manual_seed(12345)
    x = torch.rand((1, *shape), generator=gen) + 0.25 * torch.randn((rows, *shape), generator=gen)
    x = x.to(device=device, dtype=dtype)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def eager_forward(model: nn.Module, batch: torch.Tensor, dtype: torch.dtype, micro_batch: int):
    """The engine's eager forward (autocast to ``dtype``; micro-batches of ``micro_batch`` rows)."""
    amp = dtype != torch.float32
    with torch.autocast(batch.device.type, dtype=dtype, enabled=amp, cache_enabled=False):
        parts = batch.split(micro_batch) if micro_batch and batch.shape[0] > micro_batch else (batch,)
        return [model(part) for part in parts]


@torch.inference_mode()
def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn`` (device synchronized)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


@torch.inference_mode()
def best_seconds(runs: Dict[str, Callable[[], object]], device: torch.device, rounds: int = 3,
                 min_sample: float = 0.05) -> Dict[str, float]:
    """Seconds per call of each run: the best of ``rounds`` samples, interleaved so that a
    disturbance of the machine hits every candidate alike, after one warm-up call each. A sample is
    as many calls as make ``min_sample`` seconds (by the warm-up): a short call alone would measure
    the scheduler (on a busy CPU one stalled thread costs a quantum, ~10 ms) more than the model."""
    repeats = {}
    for name, fn in runs.items():
        first = time_once(fn, device)
        repeats[name] = max(1, min(100, math.ceil(min_sample / max(first, 1e-6))))
    best = {name: math.inf for name in runs}
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            _sync(device)
            start = time.perf_counter()
            for _ in range(repeats[name]):
                runs[name]()
            _sync(device)
            best[name] = min(best[name], (time.perf_counter() - start) / repeats[name])
    return best


# -- the compile decision -------------------------------------------------------------------------

@dataclass(frozen=True)
class CompileEstimate:
    """What compiling is expected to cost and gain: from the cache if this model shape compiled on
    this device before, else the defaults above."""

    seconds: float
    speedup: float
    source: str  # "measured" or "default"


def median_of(values) -> "float | None":
    """The median of the positive numbers in a cached list (None if there are none)."""
    import statistics

    numbers = [float(v) for v in values or [] if isinstance(v, (int, float)) and v > 0]
    return statistics.median(numbers) if numbers else None


def estimate_compile(entry: dict, device: torch.device, modules: int) -> CompileEstimate:
    """From the cache's last (up to 5) measurements of this model shape on this device: the least
    compile time (the kernels stay in the compile cache, so the next compile is a warm one) and the
    median speed-up (each measured against eager at the same moment); else the defaults."""
    measured = [float(v) for v in entry.get("compile_seconds") or [] if isinstance(v, (int, float))]
    speedup = median_of(entry.get("speedups"))
    if measured and speedup is not None:
        return CompileEstimate(min(measured), speedup, "measured")
    base, per_module = DEFAULT_COMPILE_SECONDS.get(device.type, DEFAULT_COMPILE_SECONDS["cuda"])
    return CompileEstimate(base + per_module * modules, DEFAULT_SPEEDUP.get(device.type, 1.3), "default")


def should_compile(eager_seconds_per_copy: float, copies: int, estimate: CompileEstimate) -> bool:
    """Compile when the forward time it is expected to save on the announced work exceeds its
    expected cost by COMPILE_MARGIN: eager * copies * (1 - 1/speedup) > margin * compile time."""
    if estimate.speedup <= 1.0 or copies <= 0:
        return False
    saved = eager_seconds_per_copy * copies * (1.0 - 1.0 / estimate.speedup)
    return saved > COMPILE_MARGIN * estimate.seconds


# -- the compiled model ---------------------------------------------------------------------------

def use_compile_cache() -> str:
    """Point inductor's cache at fastsmooth's cache folder unless the user chose one; the folder."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


class CompiledModel:
    """``torch.compile`` of a model for inference, one static shape per call size.

    CPU: inductor with freezing (weights folded into the graph as constants and prepacked for
    oneDNN; without it the compiled bf16 ResNet-20 ran at 600 copies/s here, with it at 10,000-16,500
    against 4,000-6,500 eager). Freezing is patched in around each call (torch.compile's
    ``options={"freezing": True}`` did not enable it in torch 2.13), so the user's own compiles are
    untouched. CUDA: the same, without inductor's CUDA graphs (``triton.cudagraphs``): the engine
    captures the compiled forward in its own graph. Frozen weights are copies: ``stale()`` tells the
    engine when the model's weights have changed since, and it rebuilds.
    """

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.cache_dir = use_compile_cache()
        self.signature = weights_signature(model)
        options = {"triton.cudagraphs": False} if device.type == "cuda" else None
        self._fn = torch.compile(model, dynamic=False, options=options)

    def stale(self) -> bool:
        return weights_signature(self.model) != self.signature

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self._fn(x)


def compile_failure_line(exc: BaseException) -> str:
    """The one line printed when compilation fails and the engine runs the model eagerly."""
    text = first_line(exc) or type(exc).__name__
    return f"fastsmooth: torch.compile failed ({type(exc).__name__}: {text[:300]}); running the model eagerly"


def report_compile_failure(exc: BaseException) -> None:
    print(compile_failure_line(exc), file=sys.stderr, flush=True)


# -- the batch that fills a GPU -------------------------------------------------------------------

CPU_BATCH = 1000           # on a CPU micro-batches keep activations in the caches; the batch only packs
GPU_BATCH_START = 1000
GPU_BATCH_MAX = 1 << 17
GPU_MEMORY_SHARE = 0.5     # of the free memory at the start: the batch buffer, activations, noise
GPU_BATCH_GAIN = 1.05      # a doubling must gain this much throughput to be taken


def gpu_batch_candidates(start: int, per_copy_bytes: float, free_bytes: int,
                         share: float = GPU_MEMORY_SHARE, limit: int = GPU_BATCH_MAX) -> list:
    """start, 2 start, 4 start, ... while a forward of that many copies (``per_copy_bytes`` each,
    measured: activations + input) fits in ``share`` of the free memory; at least [start]."""
    cap = min(limit, int(share * free_bytes / max(per_copy_bytes, 1.0)))
    out = [start]
    while out[-1] * 2 <= cap:
        out.append(out[-1] * 2)
    return out


def pick_batch(per_copy_seconds: Dict[int, float], gain: float = GPU_BATCH_GAIN) -> int:
    """The smallest batch after which doubling stops paying ``gain`` in throughput."""
    sizes = sorted(per_copy_seconds)
    best = sizes[0]
    for b in sizes[1:]:
        if per_copy_seconds[best] / per_copy_seconds[b] < gain:
            break
        best = b
    return best


def measure_gpu_batch(make_run: Callable[[int], Callable[[], object]], device: torch.device,
                      start: int = GPU_BATCH_START) -> tuple:
    """(batch, details): the per-copy memory of a forward of ``start`` copies (peak allocation above
    what was allocated before), then timed forwards at doubling sizes up to the memory share, stopping
    when a doubling gains less than GPU_BATCH_GAIN. ``make_run(rows)`` returns a zero-argument
    forward of ``rows`` copies (its batch made beforehand)."""
    torch.cuda.synchronize(device)
    free, _ = torch.cuda.mem_get_info(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        make_run(start)()
    torch.cuda.synchronize(device)
    per_copy = max(1.0, (torch.cuda.max_memory_allocated(device) - base) / start)
    sizes = gpu_batch_candidates(start, per_copy, free)
    timed: Dict[int, float] = {}
    for rows in sizes:
        timed[rows] = best_seconds({"forward": make_run(rows)}, device, rounds=2)["forward"] / rows
        if len(timed) > 1 and timed[rows // 2] / timed[rows] < GPU_BATCH_GAIN:
            break
        torch.cuda.empty_cache()
    return pick_batch(timed), {"per_copy_bytes": per_copy, "free_bytes": free,
                               "seconds_per_copy": {str(k): v for k, v in timed.items()}}
