"""Device facts for benchmark records (DESIGN §6): what machine a throughput figure was measured on.

``device_facts(device)`` never raises: on CUDA it asks NVML (nvidia-ml-py) for the GPU's name,
driver, memory, clocks, power and utilization, and records any NVML failure under "nvml_error"
beside the facts torch itself knows; on the CPU it reads the model name, core count, the flags that
decide bf16 speed (avx512_bf16, amx_bf16, avx512f) and the memory. Versions of python, torch and
triton are always present. Every value is json-able (str, int, float, bool, list, None).
"""

from __future__ import annotations

import os
import platform
import sys
import torch

from .allocator import cpu_allocator_tuned
from .cpu import proc_cpuinfo, usable_cores

CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "avx2")


def device_facts(device=None) -> dict:
    """A json-able dict describing ``device`` (default: cuda if available, else cpu) and the software."""
    try:
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as exc:
        facts = _versions()
        facts.update(device=str(device), error=f"{type(exc).__name__}: {exc}")
        return facts
    facts = {"device": str(device), "device_type": device.type}
    facts.update(_versions())
    try:
        if device.type == "cuda":
            facts.update(_cuda_facts(device))
        else:
            facts.update(_cpu_facts())
    except Exception as exc:  # facts are a courtesy: a benchmark must never die of them
        facts["error"] = f"{type(exc).__name__}: {exc}"
    return facts


def _versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # ImportError, or a broken install
        triton_version = None
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "cuda_runtime": torch.version.cuda, "platform": platform.platform()}


# -- CPU ------------------------------------------------------------------------------------------

def _cpu_facts() -> dict:
    info = proc_cpuinfo()
    flags = set(info.get("flags", "").split())
    facts = {
        "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "usable_cores": usable_cores(),  # affinity capped by a cgroup quota (what the engine's threads use)
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS} if flags else None,
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "memory_total_bytes": None,
        "memory_available_bytes": None,
        # Other processes share this CPU's cores: a load average well above torch_threads means the
        # wall-clock figures of this record were disturbed.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        # glibc keeps freed memory for the next batch (allocator.py): CPU forwards run much faster
        "malloc_tuned": cpu_allocator_tuned(),
    }
    mem = _proc_meminfo()
    if "MemTotal" in mem:
        facts["memory_total_bytes"] = mem["MemTotal"]
    if "MemAvailable" in mem:
        facts["memory_available_bytes"] = mem["MemAvailable"]
    return facts


def _proc_meminfo() -> dict:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                parts = value.split()
                if parts and parts[0].isdigit():
                    out[key.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    except OSError:
        pass
    return out


# -- CUDA -----------------------------------------------------------------------------------------

def _cuda_facts(device: torch.device) -> dict:
    facts = {}
    index = device.index if device.index is not None else (torch.cuda.current_device() if torch.cuda.is_available() else 0)
    facts["cuda_index"] = index
    try:
        props = torch.cuda.get_device_properties(index)
        facts.update(
            torch_device_name=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            multiprocessor_count=props.multi_processor_count,
            torch_memory_total_bytes=props.total_memory,
            torch_memory_allocated_bytes=torch.cuda.memory_allocated(index),
            torch_memory_reserved_bytes=torch.cuda.memory_reserved(index),
            bf16_supported=bool(torch.cuda.is_bf16_supported()),
            cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32),
            tf32_cudnn=bool(torch.backends.cudnn.allow_tf32),  # fp32 convolutions run in TF32 when True
        )
    except Exception as exc:
        facts["torch_cuda_error"] = f"{type(exc).__name__}: {exc}"
    facts.update(_nvml_facts(index))
    return facts


def _nvml_facts(index: int) -> dict:
    """NVML facts for GPU ``index``; on any NVML failure what was gathered plus "nvml_error"."""
    try:
        import pynvml
    except Exception as exc:
        return {"nvml_error": f"nvidia-ml-py unavailable: {exc}"}
    facts, errors = {}, []
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return {"nvml_error": f"nvmlInit: {_nvml_message(exc)}"}
    try:
        handle = _nvml_handle(pynvml, index)

        def ask(key, fn, *args, convert=None):
            try:
                value = fn(*args)
                if isinstance(value, bytes):
                    value = value.decode(errors="replace")
                facts[key] = convert(value) if convert else value
            except Exception as exc:
                errors.append(f"{key}: {_nvml_message(exc)}")

        ask("driver", pynvml.nvmlSystemGetDriverVersion)
        ask("nvml_version", pynvml.nvmlSystemGetNVMLVersion)
        if handle is None:
            errors.append(f"no NVML handle for GPU {index}")
        else:
            ask("name", pynvml.nvmlDeviceGetName, handle)
            ask("uuid", pynvml.nvmlDeviceGetUUID, handle)
            ask("memory", pynvml.nvmlDeviceGetMemoryInfo, handle,
                convert=lambda m: {"total_bytes": int(m.total), "used_bytes": int(m.used), "free_bytes": int(m.free)})
            clock = pynvml.nvmlDeviceGetClockInfo
            max_clock = pynvml.nvmlDeviceGetMaxClockInfo
            ask("sm_clock_mhz", clock, handle, pynvml.NVML_CLOCK_SM)
            ask("memory_clock_mhz", clock, handle, pynvml.NVML_CLOCK_MEM)
            ask("sm_clock_max_mhz", max_clock, handle, pynvml.NVML_CLOCK_SM)
            ask("memory_clock_max_mhz", max_clock, handle, pynvml.NVML_CLOCK_MEM)
            ask("power_draw_w", pynvml.nvmlDeviceGetPowerUsage, handle, convert=lambda mw: mw / 1000.0)
            ask("power_limit_w", pynvml.nvmlDeviceGetEnforcedPowerLimit, handle, convert=lambda mw: mw / 1000.0)
            ask("utilization", pynvml.nvmlDeviceGetUtilizationRates, handle,
                convert=lambda u: {"gpu_percent": int(u.gpu), "memory_percent": int(u.memory)})
            ask("temperature_c", pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU)
            ask("pstate", pynvml.nvmlDeviceGetPerformanceState, handle, convert=lambda p: f"P{int(p)}")
            ask("mig_mode", pynvml.nvmlDeviceGetMigMode, handle, convert=lambda m: int(m[0]))
    except Exception as exc:
        errors.append(_nvml_message(exc))
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    if errors:
        facts["nvml_error"] = "; ".join(errors)
    return facts


def _nvml_handle(pynvml, index: int):
    """The NVML handle of torch's GPU ``index``, matched by PCI bus id (CUDA_VISIBLE_DEVICES renumbers
    devices for torch but not for NVML); by index when the bus id is unknown."""
    try:
        props = torch.cuda.get_device_properties(index)
        bus = "%08x:%02x:%02x.0" % (props.pci_domain_id, props.pci_bus_id, props.pci_device_id)
        return pynvml.nvmlDeviceGetHandleByPciBusId(bus.encode())
    except Exception:
        pass
    try:
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:
        return None


def _nvml_message(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def summary(facts: dict) -> str:
    """One line naming the machine, for tables."""
    if facts.get("device_type") == "cuda":
        name = facts.get("name") or facts.get("torch_device_name") or "CUDA device"
        mem = (facts.get("memory") or {}).get("total_bytes") or facts.get("torch_memory_total_bytes")
        parts = [name]
        if mem:
            parts.append(f"{mem / 2**30:.0f} GiB")
        if facts.get("driver"):
            parts.append(f"driver {facts['driver']}")
        if facts.get("sm_clock_mhz") is not None:
            parts.append(f"SM {facts['sm_clock_mhz']} MHz")
        if facts.get("power_limit_w") is not None:
            parts.append(f"power limit {facts['power_limit_w']:.0f} W")
    else:
        parts = [str(facts.get("cpu_model", "CPU")), f"{facts.get('cpu_count')} cores",
                 f"{facts.get('torch_threads')} torch threads"]
        flags = [k for k, v in (facts.get("cpu_flags") or {}).items() if v and k != "avx2"]
        if flags:
            parts.append(" ".join(flags))
        if facts.get("memory_total_bytes"):
            parts.append(f"{facts['memory_total_bytes'] / 2**30:.0f} GiB RAM")
        if facts.get("load_average"):
            parts.append(f"load {facts['load_average'][0]:.2f}")
        if "malloc_tuned" in facts:
            parts.append("malloc tuned" if facts["malloc_tuned"] else "default malloc")
    parts.append(f"torch {facts.get('torch')}, triton {facts.get('triton')}, python {facts.get('python')}")
    return ", ".join(parts)


if __name__ == "__main__":  # python -m fastsmooth.telemetry [device]
    import json

    print(json.dumps(device_facts(sys.argv[1] if len(sys.argv) > 1 else None), indent=2))
