"""telemetry.device_facts: CPU facts, and NVML failures reported, never raised."""

import json
import sys
import types

import torch

from fastsmooth import telemetry
from fastsmooth.telemetry import CPU_FLAGS, device_facts, summary


def test_cpu_facts_are_a_json_dict_with_versions():
    facts = device_facts("cpu")
    assert isinstance(facts, dict)
    json.dumps(facts)  # json-able as pytest-benchmark's extra_info must be
    assert facts["device_type"] == "cpu"
    assert facts["torch"] == torch.__version__ and facts["python"]
    assert "triton" in facts
    assert isinstance(facts["cpu_count"], int) and facts["cpu_count"] >= 1
    assert facts["torch_threads"] == torch.get_num_threads()
    assert facts["cpu_model"]
    if facts["cpu_flags"] is not None:  # Linux: /proc/cpuinfo
        assert set(CPU_FLAGS) <= set(facts["cpu_flags"])
        assert all(isinstance(v, bool) for v in facts["cpu_flags"].values())
        assert facts["memory_total_bytes"] > 0
    assert "error" not in facts
    assert "cores" in summary(facts)


def test_default_device_and_bad_device_never_raise():
    assert device_facts()["device_type"] in ("cpu", "cuda")
    facts = device_facts("no-such-device")
    assert "error" in facts and facts["torch"] == torch.__version__


def test_cuda_facts_without_a_usable_gpu_do_not_raise():
    if torch.cuda.is_available():
        return
    facts = device_facts("cuda")
    assert facts["device_type"] == "cuda"
    assert "nvml_error" in facts or "torch_cuda_error" in facts
    json.dumps(facts)


class _NVMLError(Exception):
    pass


def _fake_pynvml(fail_init=False, fail=()):
    m = types.ModuleType("pynvml")
    m.NVML_CLOCK_SM, m.NVML_CLOCK_MEM, m.NVML_TEMPERATURE_GPU = 1, 2, 0

    def call(name, value):
        def fn(*args):
            if name in fail:
                raise _NVMLError(f"{name} not supported")
            return value
        return fn

    def init():
        if fail_init:
            raise _NVMLError("Driver Not Loaded")

    m.nvmlInit, m.nvmlShutdown = init, lambda: None
    m.nvmlSystemGetDriverVersion = call("driver", b"550.54")
    m.nvmlSystemGetNVMLVersion = call("nvml", "12.550")
    m.nvmlDeviceGetHandleByPciBusId = call("bus", object())
    m.nvmlDeviceGetHandleByIndex = call("index", object())
    m.nvmlDeviceGetName = call("name", "NVIDIA H100 80GB HBM3")
    m.nvmlDeviceGetUUID = call("uuid", "GPU-0")
    m.nvmlDeviceGetMemoryInfo = call("memory", types.SimpleNamespace(total=80 << 30, used=1 << 30, free=79 << 30))
    m.nvmlDeviceGetClockInfo = call("clock", 1980)
    m.nvmlDeviceGetMaxClockInfo = call("maxclock", 1980)
    m.nvmlDeviceGetPowerUsage = call("power", 123456)
    m.nvmlDeviceGetEnforcedPowerLimit = call("powerlimit", 700000)
    m.nvmlDeviceGetUtilizationRates = call("util", types.SimpleNamespace(gpu=97, memory=40))
    m.nvmlDeviceGetTemperature = call("temp", 45)
    m.nvmlDeviceGetPerformanceState = call("pstate", 0)
    m.nvmlDeviceGetMigMode = call("mig", (0, 0))
    return m


def test_nvml_facts_from_a_working_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    facts = telemetry._nvml_facts(0)
    assert "nvml_error" not in facts
    assert facts["name"] == "NVIDIA H100 80GB HBM3" and facts["driver"] == "550.54"
    assert facts["memory"]["total_bytes"] == 80 << 30
    assert facts["sm_clock_mhz"] == 1980 and facts["memory_clock_mhz"] == 1980
    assert facts["power_draw_w"] == 123.456 and facts["power_limit_w"] == 700.0
    assert facts["utilization"] == {"gpu_percent": 97, "memory_percent": 40}
    json.dumps(facts)


def test_nvml_errors_are_recorded_not_raised(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(fail=("power", "util")))
    facts = telemetry._nvml_facts(0)
    assert facts["name"] == "NVIDIA H100 80GB HBM3"  # what worked is kept
    assert "power_draw_w" not in facts and "utilization" not in facts
    assert "power_draw_w" in facts["nvml_error"] and "utilization" in facts["nvml_error"]

    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(fail_init=True))
    facts = telemetry._nvml_facts(0)
    assert facts == {"nvml_error": "nvmlInit: _NVMLError: Driver Not Loaded"}
