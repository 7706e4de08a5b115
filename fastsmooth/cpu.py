"""The CPU facts the engine decides by: the processor's flags, the cores this process may use, and
how many of them other processes keep busy.

* ``has_bf16_units()``: AMX or AVX512-BF16 in /proc/cpuinfo. Without them bf16 arithmetic is
  emulated by conversions (7.5x slower than fp32 on an AVX2 EPYC, DESIGN §6), so the engine does not
  even time it; with them it still times it (tuning.py), because the flags can mislead: a small
  model may run slower in bf16, or a virtual machine may list AMX without enabling it.
* ``usable_cores()``: the scheduler affinity, capped by a cgroup (v2) CPU quota.
* ``CpuLoad`` / ``choose_threads``: intra-op threads that leave the cores other processes use alone.
  OpenMP's parallel regions end in barriers, so one of our threads that shares a core with another
  process holds the whole forward back by scheduler quanta. Measured here (2-core Xeon, another
  process busy on one core, ResNet-20 bf16 forwards of 1000 copies): 2 threads 460 copies/s median
  (4,590 best), 1 thread 2,862 median. The choice changes no result: the logits of the eager and
  the compiled ResNet-20 (fp32 and bf16) were bit-identical at 1 and 2 threads (see tests).
"""

from __future__ import annotations

import math
import os
import time
from functools import lru_cache
from typing import Optional


def proc_cpuinfo() -> dict:
    """The first processor's block of /proc/cpuinfo (Linux); {} elsewhere."""
    out = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if out:
                        break
                    continue
                key, _, value = line.partition(":")
                out.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return out


@lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The instruction-set flags of /proc/cpuinfo (empty where there is none)."""
    return frozenset(proc_cpuinfo().get("flags", "").split())


@lru_cache(maxsize=None)
def cpu_model() -> str:
    import platform

    return proc_cpuinfo().get("model name") or platform.processor() or platform.machine() or "cpu"


def has_bf16_units() -> bool:
    """AMX or AVX512-BF16: bf16 arithmetic in hardware (worth timing against fp32)."""
    flags = cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _cgroup_quota_cores(path: str = "/sys/fs/cgroup/cpu.max") -> Optional[float]:
    """Cores allowed by a cgroup v2 quota ("max 100000" means none)."""
    try:
        with open(path) as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(float(quota) / float(period), 0.0)
    except (ValueError, ZeroDivisionError):
        return None


def usable_cores() -> int:
    """CPUs this process may run on (affinity), capped by a cgroup quota; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota_cores()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def choose_threads(cores: int, others_busy: float, ceiling: int) -> int:
    """Intra-op threads for the next engine call: the cores left by other processes, rounded down
    unless nearly free (0.3 of a core of background work is ignored), at least 1, at most
    ``ceiling`` (the caller's torch.get_num_threads(): the engine never raises it)."""
    free = math.floor(cores - max(0.0, others_busy) + 0.3)
    return max(1, min(int(ceiling), free))


def _busy_seconds() -> Optional[float]:
    """CPU seconds all processes have spent busy since boot (/proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is in user)
    return busy / os.sysconf("SC_CLK_TCK")


class CpuLoad:
    """How many cores other processes kept busy between two looks (/proc/stat minus this process's
    own CPU time). The first look has no earlier one to compare with: it takes the 1-minute load
    average less what this process can have added to it (a short window would miss other
    processes' bursts, and one thread too many costs far more than one too few: 150x for a small
    CNN here, 1.3-2x the other way), unless fewer threads are runnable right now."""

    # /proc/stat counts in ticks of 10 ms per core: over a window of a tenth of a second its error is
    # +-0.2 cores, and one engine call (a batch or a few) is shorter than that. Measured here between
    # calls 0.1 s apart on a quiet machine: estimates from 0 to 3.7 cores. So a look re-measures only
    # once a window of WINDOW seconds has passed, and otherwise repeats the last estimate.
    WINDOW = 1.0

    def __init__(self):
        self._last = None  # (wall, all processes' busy seconds, this process's CPU seconds)
        self._estimate = 0.0

    def _sample(self):
        busy = _busy_seconds()
        return None if busy is None else (time.perf_counter(), busy, time.process_time())

    def others_busy(self) -> float:
        """Cores used by other processes over the last window (0.0 where /proc/stat is missing)."""
        if self._last is None:
            self._last = self._sample()
            self._estimate = min(others_by_load_average(), others_running_now())
            return self._estimate
        now = self._sample()
        if now is None:
            return 0.0
        wall = now[0] - self._last[0]
        if wall < self.WINDOW:
            return self._estimate
        others = (now[1] - self._last[1]) - (now[2] - self._last[2])
        self._last = now
        self._estimate = max(0.0, others / wall)
        return self._estimate


def others_running_now() -> float:
    """Other processes' threads runnable right now: /proc/loadavg's fourth field (every runnable
    thread) less this process's own runnable threads (its OpenMP team may still be spinning after a
    torch op); inf where unknown, so that it never lowers a min. The load average remembers the last
    minute: a job that just ended would cost the first second of a run its second core; a process
    busy now is runnable now."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        own = 0
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/stat") as f:
                    own += f.read().rsplit(")", 1)[1].split()[0] == "R"
            except OSError:
                continue
    except (OSError, IndexError, ValueError):
        return math.inf
    return float(max(0, running - max(own, 1)))


def others_by_load_average() -> float:
    """The 1-minute load average less this process's CPU seconds over the last minute at most
    (an upper bound of its share: all of them if it is younger than a minute); 0 where unknown."""
    try:
        load1 = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0
    return max(0.0, load1 - time.process_time() / 60.0)
