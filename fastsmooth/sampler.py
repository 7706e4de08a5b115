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

import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from .allocator import tune_cpu_allocator
from .backends import make_backend
from .grid import check_input_grid, grid_indices
from .noises import Noise
from .seeding import DOMAIN_CERTIFY
from .telemetry import proc_cpuinfo

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


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 on this CPU (Linux /proc/cpuinfo): bf16 autocast is then fast."""
    flags = set(proc_cpuinfo().get("flags", "").split())
    return "amx_bf16" in flags or "avx512_bf16" in flags


# On a CPU, bf16 autocast pays off for models with enough arithmetic per copy (measured here with
# AMX: ResNet-20, 41 M multiply-adds, runs 1.7x faster in bf16; the 0.4 M multiply-add embedded CNN
# runs 2.5x slower). The rule is deterministic, so a resumed run resolves it the same way.
CPU_BF16_MIN_MACS = 5_000_000


def resolve_precision(precision: str, device: torch.device, macs_per_copy=None) -> Optional[torch.dtype]:
    """The model's dtype; for "auto" on a bf16-capable CPU it needs ``macs_per_copy`` (None until known)."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        if device.type != "cpu" or not cpu_has_fast_bf16():
            return torch.float32
        if macs_per_copy is None:
            return None
        return torch.bfloat16 if macs_per_copy >= CPU_BF16_MIN_MACS else torch.float32
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
                 cuda_graph="auto", compile: bool = False, micro_batch="auto", input_grid=None):
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
        self._precision_request, self._channels_last_request = precision, channels_last
        self.dtype = resolve_precision(precision, self.device)  # None: "auto", resolved by prepare()
        self.channels_last = False
        self.backend = make_backend(backend, self.device)
        if self.dtype is not None:
            self._set_layout()
        self._buffer: Optional[torch.Tensor] = None
        self._slots: Optional[torch.Tensor] = None
        # On CUDA the forward of a full batch is captured once in a CUDA graph over the static batch
        # buffer and replayed: one launch instead of one per layer. Falls back to eager if capture fails.
        self.cuda_graph = self.device.type == "cuda" if cuda_graph == "auto" else bool(cuda_graph)
        self._graphs = {}  # (buffer pointer, batch shape) -> (graph, its static logits)
        # Opt-in torch.compile: the compiled forward is part of the base classifier (its numerics
        # may differ in the last bits), so it is recorded with the results like the precision.
        self.compile = bool(compile)
        self._net = torch.compile(self.model) if self.compile else self.model
        self._compiled_shapes: set = set()
        self.compile_seconds = 0.0  # wall time of the first forward of each batch shape, compiling
        # Copies per model call, 0 for the whole batch ("auto" until prepare(), see
        # resolve_micro_batch). Which copies share a call can change a model's last bits, so this
        # too is recorded with the results.
        self.micro_batch = (micro_batch if micro_batch == "auto"
                            else resolve_micro_batch(micro_batch, self.device, torch.float32, None))

    def _set_layout(self) -> None:
        if self._channels_last_request == "auto":
            self.channels_last = self.device.type == "cuda" or self.dtype != torch.float32
        else:
            self.channels_last = bool(self._channels_last_request)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def prepare(self, shape) -> None:
        """Resolve the "auto" choices for inputs of ``shape``, once: the precision on a CPU (by the
        model's multiply-adds) and the copies per model call (resolve_micro_batch)."""
        if self.dtype is not None and self.micro_batch != "auto":
            return
        probe = probe_model(self.model, tuple(shape), self.device) if self.device.type == "cpu" else None
        if self.dtype is None:
            self.dtype = resolve_precision(self._precision_request, self.device, probe.macs)
            self._set_layout()
        if self.micro_batch == "auto":
            self.micro_batch = resolve_micro_batch("auto", self.device, self.dtype, probe)

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
        buf = self._buffer
        if buf is None or buf.shape[0] < batch_size or tuple(buf.shape[1:]) != tuple(shape):
            buf = torch.empty((batch_size, *shape), dtype=self.dtype, device=self.device)
            if self.channels_last and buf.dim() == 4:
                buf = buf.to(memory_format=torch.channels_last)
            self._buffer = buf
            self._graphs.clear()  # graphs of the old buffer: free their memory pools
        return buf[:batch_size]

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        amp = self.dtype != torch.float32
        # cache_enabled=False: autocast's weight-cast cache cannot live across CUDA-graph replays.
        net = self._net_micro_batches if self.micro_batch and batch.shape[0] > self.micro_batch else self._net
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=amp, cache_enabled=False):
            if self.compile and tuple(batch.shape) not in self._compiled_shapes:
                start = time.perf_counter()
                logits = net(batch)
                if batch.is_cuda:
                    torch.cuda.synchronize(batch.device)
                self.compile_seconds += time.perf_counter() - start
                self._compiled_shapes.add(tuple(batch.shape))
            else:
                logits = net(batch)
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}; expected "
                             f"(batch, {self.num_classes}) for num_classes={self.num_classes}")
        return logits

    def _net_micro_batches(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._net(part) for part in batch.split(self.micro_batch)])

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

    def run(self, jobs: Sequence[Job], batch_size: int = 1000, soft: bool = False) -> torch.Tensor:
        """Per-job totals on the CPU: int64 vote counts (M, K), or float64 softmax sums with soft=True."""
        return self.submit(jobs, batch_size, soft).result()

    @torch.inference_mode()
    def submit(self, jobs: Sequence[Job], batch_size: int = 1000, soft: bool = False) -> "PendingTotals":
        """Queue the work of ``run`` and return at once where the device runs asynchronously (CUDA):
        the totals come back through ``result()``. No step of it waits for the device: the images go
        up from pinned memory, the counts stay on the device and come down by one asynchronous copy."""
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not jobs:
            return PendingTotals(torch.zeros((0, self.num_classes), dtype=torch.float64 if soft else torch.int64))
        shape = tuple(jobs[0].x.shape)
        self.prepare(shape)
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
