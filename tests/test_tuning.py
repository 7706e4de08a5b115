"""The engine's choices by measurement (issue 15): the compile decision by the announced work, the
eager fallback of a model that cannot compile, bf16 only where it is timed faster, threads that
leave busy cores alone, and resumed runs that reuse the recorded choices instead of measuring again.

Timings are injected: these tests check what the engine decides from given timings, never how fast
anything runs (speed is measured in bench/).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastsmooth
from fastsmooth import cpu, tuning
from fastsmooth.cli import main
from fastsmooth.models import get_architecture
from fastsmooth.sampler import Sampler

REPO = Path(__file__).resolve().parents[1]
SHAPE = (1, 8, 8)


@pytest.fixture
def tuned(monkeypatch, tmp_path):
    """Timed choices on (the suite runs with FASTSMOOTH_TUNING=off), in a cache of the test's own."""
    monkeypatch.setenv("FASTSMOOTH_TUNING", "on")
    monkeypatch.setenv("FASTSMOOTH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class FakeCompiled:
    """Stands in for tuning.CompiledModel (no inductor): the eager model, with its calls counted."""

    calls = 0

    def __init__(self, model, device):
        self.model, self.cache_dir = model, "-"

    def stale(self):
        return False

    def __call__(self, x):
        FakeCompiled.calls += 1
        return self.model(x)


def cnn():
    torch.manual_seed(0)
    return get_architecture("cnn", "digits").eval()


def _inject_compile(monkeypatch, eager_seconds_per_copy=1e-3, compile_seconds=10.0, speedup=2.0):
    """Eager 1 ms per copy, compile 10 s, twice as fast compiled: compiling pays above
    1.25 * 10 / (1e-3 * (1 - 1/2)) = 25,000 copies."""
    monkeypatch.setattr(Sampler, "_eager_seconds_per_copy", lambda self, *a: eager_seconds_per_copy)
    monkeypatch.setattr(tuning, "estimate_compile",
                        lambda entry, device, modules: tuning.CompileEstimate(compile_seconds, speedup, "test"))
    monkeypatch.setattr(tuning, "CompiledModel", FakeCompiled)
    FakeCompiled.calls = 0


# -- pure rules -----------------------------------------------------------------------------------

def test_should_compile_worked_values():
    est = tuning.CompileEstimate(seconds=10.0, speedup=2.0, source="default")
    # saved = 1e-3 s * copies * 0.5 against 1.25 * 10 s: the break-even is 25,000 copies
    assert not tuning.should_compile(1e-3, 24_999, est)
    assert tuning.should_compile(1e-3, 25_001, est)
    assert not tuning.should_compile(1.0, 10**9, tuning.CompileEstimate(1.0, 1.0, "measured"))  # no gain
    assert not tuning.should_compile(1.0, 0, est)


def test_compile_estimate_from_cache_or_defaults():
    cpu_dev = torch.device("cpu")
    default = tuning.estimate_compile({}, cpu_dev, modules=100)
    base, per = tuning.DEFAULT_COMPILE_SECONDS["cpu"]
    assert default == tuning.CompileEstimate(base + 100 * per, tuning.DEFAULT_SPEEDUP["cpu"], "default")
    measured = tuning.estimate_compile({"compile_seconds": [14.0, 4.0, 5.0], "speedups": [2.0, 3.0, 2.5]}, cpu_dev, 100)
    assert measured == tuning.CompileEstimate(4.0, 2.5, "measured")  # least time (warm), median gain


def test_parse_compile():
    assert [tuning.parse_compile(v) for v in ("auto", "ON", "off", True, False)] == ["auto", "on", "off", "on", "off"]
    with pytest.raises(ValueError, match="compile must be"):
        tuning.parse_compile("sometimes")


def test_choose_threads_worked_values():
    assert cpu.choose_threads(cores=2, others_busy=0.0, ceiling=2) == 2
    assert cpu.choose_threads(cores=2, others_busy=0.2, ceiling=2) == 2   # background noise ignored
    assert cpu.choose_threads(cores=2, others_busy=1.0, ceiling=2) == 1   # another process on a core
    assert cpu.choose_threads(cores=2, others_busy=5.0, ceiling=2) == 1   # at least one
    assert cpu.choose_threads(cores=16, others_busy=3.5, ceiling=8) == 8  # never above the ceiling
    assert cpu.choose_threads(cores=16, others_busy=3.5, ceiling=16) == 12


def test_the_first_load_look_reads_the_load_average(monkeypatch):
    """A fraction of a second can miss other processes' bursts: the first look also takes the
    1-minute load average less what this process can have added (its CPU seconds / 60)."""
    monkeypatch.setattr(cpu.os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    monkeypatch.setattr(cpu.time, "process_time", lambda: 6.0)  # this process: at most 0.1 of it
    assert cpu.others_by_load_average() == pytest.approx(2.9)
    monkeypatch.setattr(cpu, "others_running_now", lambda: 3.0)
    assert cpu.CpuLoad().others_busy() == pytest.approx(2.9)  # the first look
    assert cpu.choose_threads(cores=2, others_busy=2.9, ceiling=2) == 1
    # a load average left by a job that has ended: nothing else runnable now, both cores taken
    monkeypatch.setattr(cpu, "others_running_now", lambda: 0.0)
    assert cpu.CpuLoad().others_busy() == 0.0


def test_later_looks_measure_a_window_of_a_second(monkeypatch):
    """/proc/stat's 10 ms ticks make a tenth-of-a-second window err by +-0.2 cores: a look within
    CpuLoad.WINDOW of the last measurement repeats the last estimate."""
    clock = {"wall": 100.0, "busy": 50.0, "own": 1.0}
    monkeypatch.setattr(cpu, "_busy_seconds", lambda: clock["busy"])
    monkeypatch.setattr(cpu.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(cpu.time, "process_time", lambda: clock["own"])
    monkeypatch.setattr(cpu, "others_running_now", lambda: 0.0)
    load = cpu.CpuLoad()
    assert load.others_busy() == 0.0
    clock.update(wall=100.1, busy=50.3, own=1.0)          # a burst of tick noise within the window
    assert load.others_busy() == 0.0
    clock.update(wall=102.0, busy=53.0, own=2.0)          # 2 s: 3 busy seconds, 1 of them ours
    assert load.others_busy() == pytest.approx(1.0)


def test_gpu_batch_rules_worked_values():
    # 1 MB per copy, 10 GB free, half of it usable: up to 5,000 copies -> 1000, 2000, 4000
    assert tuning.gpu_batch_candidates(1000, 1e6, 10**10) == [1000, 2000, 4000]
    assert tuning.gpu_batch_candidates(1000, 1e9, 10**9) == [1000]  # at least the start
    # seconds per copy: doubling to 2000 gains 1.5x, to 4000 only 1.02x -> 2000
    assert tuning.pick_batch({1000: 3e-6, 2000: 2e-6, 4000: 1.96e-6}) == 2000
    assert tuning.pick_batch({1000: 3e-6}) == 1000


def test_cgroup_quota_caps_the_cores(tmp_path):
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert cpu._cgroup_quota_cores(str(quota)) == 1.5
    quota.write_text("max 100000\n")
    assert cpu._cgroup_quota_cores(str(quota)) is None
    assert cpu.usable_cores() >= 1


# -- the compile decision -------------------------------------------------------------------------

def test_auto_compiles_when_the_announced_work_amortizes_it(tuned, monkeypatch):
    _inject_compile(monkeypatch)
    noise = fastsmooth.Gaussian(sigma=0.5)
    x = torch.rand(SHAPE)
    small = fastsmooth.Smooth(cnn(), 10, noise, precision="fp32", micro_batch=0)
    small.expect(20_000)
    small.certify(x, n0=10, n=100, batch_size=64)
    assert small.metadata["compile"] is False and small.metadata["tuning"]["compile"]["decision"] == "off"
    assert small.metadata["tuning"]["compile"]["copies"] == 20_000
    assert FakeCompiled.calls == 0

    big = fastsmooth.Smooth(cnn(), 10, noise, precision="fp32", micro_batch=0)
    big.expect(30_000)
    a = big.certify(x, n0=10, n=100, batch_size=64, image_index=3)
    assert big.metadata["compile"] is True and FakeCompiled.calls > 0
    # the compiled path computes what eager does (the fake is the eager model): same votes
    b = small.certify(x, n0=10, n=100, batch_size=64, image_index=3)
    assert torch.equal(a.counts, b.counts) and torch.equal(a.counts0, b.counts0)


def test_a_list_of_images_announces_its_own_work(tuned, monkeypatch):
    _inject_compile(monkeypatch)
    noise = fastsmooth.Gaussian(sigma=0.5)
    items = [(i, torch.rand(SHAPE)) for i in range(50)]
    few = fastsmooth.Smooth(cnn(), 10, noise, precision="fp32", micro_batch=0)
    list(few.certify_many(items[:40], n0=100, n=500, batch_size=600))     # 24,000 copies
    many = fastsmooth.Smooth(cnn(), 10, noise, precision="fp32", micro_batch=0)
    list(many.certify_many(items, n0=100, n=500, batch_size=600))         # 30,000 copies
    assert few.metadata["compile"] is False and many.metadata["compile"] is True
    one = fastsmooth.Smooth(cnn(), 10, noise, precision="fp32", micro_batch=0)
    one.certify(items[0][1], n0=100, n=30_000, batch_size=1000)            # one call, 30,100 copies
    assert one.metadata["compile"] is True


def test_explicit_compile_choices_are_never_second_guessed(tuned, monkeypatch):
    _inject_compile(monkeypatch, eager_seconds_per_copy=1.0)  # compiling would pay at once
    off = fastsmooth.Smooth(cnn(), 10, fastsmooth.Gaussian(sigma=0.5), precision="fp32", compile="off")
    off.certify(torch.rand(SHAPE), n0=10, n=100, batch_size=64)
    assert off.metadata["compile"] is False and FakeCompiled.calls == 0
    _inject_compile(monkeypatch, eager_seconds_per_copy=0.0)  # compiling could never pay
    on = fastsmooth.Smooth(cnn(), 10, fastsmooth.Gaussian(sigma=0.5), precision="fp32", compile=True)
    on.certify(torch.rand(SHAPE), n0=10, n=100, batch_size=64)
    assert on.metadata["compile"] is True and FakeCompiled.calls > 0


def test_compiled_calls_have_one_static_shape(tuned, monkeypatch):
    """Every call of the compiled model has the compiled size (the batch or the micro-batch): short
    batches are padded (one compile, no recompiles), and the padding changes no vote."""
    _inject_compile(monkeypatch)
    shapes = []

    class Spy(FakeCompiled):
        def __call__(self, x):
            shapes.append(x.shape[0])
            return super().__call__(x)

    monkeypatch.setattr(tuning, "CompiledModel", Spy)
    noise = fastsmooth.Gaussian(sigma=0.5)
    x = torch.rand(SHAPE)
    for micro in (0, 48):
        compiled = fastsmooth.Smooth(cnn(), 10, noise, precision="fp32", micro_batch=micro, compile="on")
        eager = fastsmooth.Smooth(cnn(), 10, noise, precision="fp32", micro_batch=micro, compile="off")
        shapes.clear()
        a = compiled.certify(x, n0=30, n=250, batch_size=100, image_index=1)  # batches 100, 100, 80
        b = eager.certify(x, n0=30, n=250, batch_size=100, image_index=1)
        assert set(shapes) == {micro or 100}
        assert torch.equal(a.counts, b.counts) and torch.equal(a.counts0, b.counts0)


def test_a_failing_compiled_forward_falls_back_to_eager_with_one_line(tuned, monkeypatch, capfd):
    """Compilation that fails (here: at the compiled forward's first call) leaves one line on
    standard error, no traceback, the eager votes and compile=False in the metadata."""

    class Broken(FakeCompiled):
        def __call__(self, x):
            raise RuntimeError("inductor: no working C++ compiler\nlong traceback here")

    monkeypatch.setattr(tuning, "CompiledModel", Broken)
    noise = fastsmooth.Gaussian(sigma=0.5)
    x = torch.rand(SHAPE)
    smooth = fastsmooth.Smooth(cnn(), 10, noise, precision="fp32", compile="on")
    a = smooth.certify(x, n0=20, n=200, batch_size=64, image_index=2)
    b = fastsmooth.Smooth(cnn(), 10, noise, precision="fp32", compile="off").certify(
        x, n0=20, n=200, batch_size=64, image_index=2)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch.compile failed" in err[0] and "running the model eagerly" in err[0], err
    assert "no working C++ compiler" in err[0] and "traceback" not in err[0]
    assert torch.equal(a.counts, b.counts) and torch.equal(a.counts0, b.counts0)
    assert smooth.metadata["compile"] is False and "failed" in smooth.metadata["tuning"]["compile"]


def test_a_compiled_model_failing_within_a_call_recounts_the_call_eagerly(tuned, monkeypatch, capfd):
    """A failure after some batches of a call already voted (a recompile that fails): the call is
    counted again, all by the eager model, so that no image's votes mix two classifiers."""

    class FailsLater(FakeCompiled):
        def __call__(self, x):
            FakeCompiled.calls += 1
            if FakeCompiled.calls > 7:  # past the compile and timing calls, within certify's batches
                raise RuntimeError("recompile failed")
            logits = self.model(x).clone()
            logits[:, 0] += 1e3  # not the eager classifier: every vote goes to class 0
            return logits

    monkeypatch.setattr(tuning, "CompiledModel", FailsLater)
    monkeypatch.setattr(Sampler, "_check_compiled", staticmethod(lambda compiled, eager: None))
    FakeCompiled.calls = 0
    noise = fastsmooth.Gaussian(sigma=0.5)
    x = torch.rand(SHAPE)
    smooth = fastsmooth.Smooth(cnn(), 10, noise, precision="fp32", compile="on")
    a = smooth.certify(x, n0=20, n=400, batch_size=64, image_index=5)
    assert FakeCompiled.calls > 7 and smooth.metadata["compile"] is False
    b = fastsmooth.Smooth(cnn(), 10, noise, precision="fp32", compile="off").certify(
        x, n0=20, n=400, batch_size=64, image_index=5)
    assert torch.equal(a.counts, b.counts) and torch.equal(a.counts0, b.counts0)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recompile failed" in err[0]


def test_a_model_that_fails_eagerly_fails_as_itself(tuned, monkeypatch, capfd):
    """A model whose own forward raises is not reported as a failed compile."""
    monkeypatch.setattr(tuning, "CompiledModel", FakeCompiled)

    class Bad(torch.nn.Module):
        def forward(self, x):
            raise ValueError("the model's own error")

    smooth = fastsmooth.Smooth(Bad(), 10, fastsmooth.Gaussian(sigma=0.5), precision="fp32", compile="on")
    with pytest.raises(ValueError, match="the model's own error"):
        smooth.certify(torch.rand(SHAPE), n0=10, n=50, batch_size=64)
    assert "torch.compile failed" not in capfd.readouterr().err


def test_a_changed_model_is_recompiled(tuned, monkeypatch):
    """Frozen weights are copies: after an in-place change of the weights the compiled model is rebuilt."""
    _inject_compile(monkeypatch)
    built = []

    class Counting(FakeCompiled):
        def __init__(self, model, device):
            super().__init__(model, device)
            self.signature = tuning.weights_signature(model)
            built.append(self)

        def stale(self):
            return tuning.weights_signature(self.model) != self.signature

    monkeypatch.setattr(tuning, "CompiledModel", Counting)
    model = cnn()
    smooth = fastsmooth.Smooth(model, 10, fastsmooth.Gaussian(sigma=0.5), precision="fp32", compile="on")
    smooth.certify(torch.rand(SHAPE), n0=10, n=50, batch_size=64)
    smooth.certify(torch.rand(SHAPE), n0=10, n=50, batch_size=64)
    assert len(built) == 1
    with torch.no_grad():
        next(model.parameters()).mul_(0.5)
    smooth.certify(torch.rand(SHAPE), n0=10, n=50, batch_size=64)
    assert len(built) == 2


@pytest.mark.slow  # a fresh process: imports torch and traces the model (~10 s)
def test_no_cxx_compiler_falls_back_to_eager_in_the_cli(tmp_path):
    """The real thing: inductor without a working C++ compiler (CXX points nowhere), in a fresh
    process with a cold compile cache. One line on stderr; the rows equal an eager run's."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]), OMP_NUM_THREADS="1",
               CXX="/nonexistent/c++", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
               FASTSMOOTH_CACHE=str(tmp_path / "cache"))
    args = ["certify", "--dataset", "digits", "--model", "_cli_models:cnn", "--samples", "200", "--n0", "20",
            "--max-index", "4", "--no-progress", "--precision", "fp32"]
    runs = {}
    for mode in ("on", "off"):
        out = tmp_path / f"{mode}.tsv"
        proc = subprocess.run([sys.executable, "-m", "fastsmooth", *args, "--compile", mode, "--out", str(out)],
                              env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[mode] = (out, proc.stderr.strip().splitlines())
    lines = runs["on"][1]
    assert len(lines) == 1 and "torch.compile failed" in lines[0] and "running the model eagerly" in lines[0], lines
    assert "Traceback" not in "\n".join(lines) and runs["off"][1] == []

    def rows(path):  # every column but time
        table = [line.split("\t") for line in Path(path).read_text().splitlines()]
        drop = table[0].index("time")
        return [[f for i, f in enumerate(r) if i != drop] for r in table]

    assert rows(runs["on"][0]) == rows(runs["off"][0])
    assert json.loads(Path(f"{runs['on'][0]}.meta.json").read_text())["compile"] is False


# -- precision, layout and threads by measurement -------------------------------------------------

def _inject_calibration(monkeypatch, seconds: dict):
    """tuning.best_seconds answers ``seconds`` (per call) for the calibration's candidates."""
    real = tuning.best_seconds

    def fake(runs, device, rounds=3):
        if all(name in seconds for name in runs):
            return {name: seconds[name] for name in runs}
        return real(runs, device, rounds)

    monkeypatch.setattr(tuning, "best_seconds", fake)


BF16, FP32 = "bf16/channels_last/micro_batch=0", "fp32/nchw/micro_batch=0"


@pytest.mark.skipif(not cpu.has_bf16_units(), reason="bf16 is only timed on CPUs with bf16 units")
def test_bf16_only_where_it_is_timed_clearly_faster(tuned, monkeypatch):
    noise = fastsmooth.Gaussian(sigma=0.5)
    for bf16, fp32, expected in ((0.5, 1.0, "bf16"), (0.95, 1.0, "fp32"), (2.0, 1.0, "fp32")):
        monkeypatch.setenv("FASTSMOOTH_CACHE", str(tuned / f"{bf16}"))
        _inject_calibration(monkeypatch, {BF16: bf16, FP32: fp32})
        smooth = fastsmooth.Smooth(cnn(), 10, noise, compile="off")
        smooth.sampler.prepare(SHAPE)
        assert smooth.metadata["precision"] == expected, (bf16, fp32)
        assert smooth.metadata["tuning"]["calibration"]["source"] == "measured"
        assert smooth.metadata["channels_last"] is (expected == "bf16")
    # a second engine on the same machine reads the cache instead of timing
    monkeypatch.setattr(tuning, "best_seconds", lambda *a, **k: pytest.fail("timed again"))
    again = fastsmooth.Smooth(cnn(), 10, noise, compile="off")
    again.sampler.prepare(SHAPE)
    assert again.metadata["precision"] == "fp32" and again.metadata["tuning"]["calibration"]["source"] == "cache"


def test_threads_follow_the_load_and_are_restored(monkeypatch):
    monkeypatch.setattr(cpu, "usable_cores", lambda: 4)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        sampler = Sampler(cnn(), 10, fastsmooth.Gaussian(sigma=0.5), precision="fp32")
        monkeypatch.setattr("fastsmooth.sampler.usable_cores", lambda: 4)
        monkeypatch.setattr(sampler._load, "others_busy", lambda: 2.9)
        with sampler.threads_for_call():
            assert torch.get_num_threads() == 1
        monkeypatch.setattr(sampler._load, "others_busy", lambda: 1.0)
        with sampler.threads_for_call():
            assert torch.get_num_threads() == 3
        assert torch.get_num_threads() == 4
        fixed = Sampler(cnn(), 10, fastsmooth.Gaussian(sigma=0.5), precision="fp32", threads=2)
        with fixed.threads_for_call():
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads must be"):
        Sampler(cnn(), 10, fastsmooth.Gaussian(sigma=0.5), threads=0)


def test_the_thread_count_changes_no_logit():
    """What lets the engine pick threads by the load: the forward's results do not depend on them
    (checked here for the small CNN, eager, fp32 and bf16)."""
    model = cnn()
    x = torch.rand((256, *SHAPE), generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    outs = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                outs[threads, "fp32"] = model(x)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    outs[threads, "bf16"] = model(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[1, "fp32"], outs[2, "fp32"]) and torch.equal(outs[1, "bf16"], outs[2, "bf16"])


def test_cpu_facts_live_with_the_engine():
    """The engine decides by fastsmooth.cpu, not by the benchmark's telemetry (which reuses it)."""
    import fastsmooth.sampler as sampler_module
    import fastsmooth.telemetry as telemetry

    assert "telemetry" not in sampler_module.__dict__ and telemetry.proc_cpuinfo is cpu.proc_cpuinfo
    flags = cpu.cpu_flags()
    assert cpu.has_bf16_units() == ("amx_bf16" in flags or "avx512_bf16" in flags)


# -- resume: the recorded choices, not new measurements -------------------------------------------

ARGS = ["certify", "--dataset", "digits", "--model", "_cli_models:cnn", "--samples", "300", "--n0", "30",
        "--batch", "100", "--max-index", "8", "--sigma", "0.25", "--seed", "3", "--no-progress"]


def _rows(path):
    table = [line.split("\t") for line in Path(path).read_text().splitlines()]
    drop = table[0].index("time")
    return [[f for i, f in enumerate(r) if i != drop] for r in table]


def _interrupt(out, keep: int):
    """OUT as a run killed after ``keep`` rows leaves it."""
    lines = Path(out).read_text().splitlines(keepends=True)
    Path(out).write_text("".join(lines[:1 + keep]))


@pytest.mark.skipif(not cpu.has_bf16_units(), reason="bf16 is only timed on CPUs with bf16 units")
def test_resume_reuses_the_recorded_precision_not_a_new_calibration(tuned, monkeypatch, tmp_path, capsys):
    _inject_calibration(monkeypatch, {BF16: 0.5, FP32: 1.0})
    full = tmp_path / "full.tsv"
    assert main([*ARGS, "--out", str(full)]) == 0
    meta = json.loads(Path(f"{full}.meta.json").read_text())
    assert meta["precision"] == "bf16" and meta["tuning"]["calibration"]["source"] == "measured"
    out = tmp_path / "out.tsv"
    assert main([*ARGS, "--out", str(out)]) == 0
    _interrupt(out, 3)
    # Now the machine (and a fresh cache) would choose fp32: the resumed run must not.
    monkeypatch.setenv("FASTSMOOTH_CACHE", str(tmp_path / "fresh"))
    _inject_calibration(monkeypatch, {BF16: 2.0, FP32: 1.0})
    fresh = tmp_path / "fresh.tsv"
    assert main([*ARGS, "--out", str(fresh)]) == 0
    assert json.loads(Path(f"{fresh}.meta.json").read_text())["precision"] == "fp32"
    assert main([*ARGS, "--out", str(out), "--resume"]) == 0
    assert _rows(out) == _rows(full)
    assert json.loads(Path(f"{out}.meta.json").read_text())["precision"] == "bf16"


def test_resume_reuses_the_recorded_compile_decision(tuned, monkeypatch, tmp_path):
    """A run that compiled (auto, by its announced work) resumes compiled, whatever the estimate
    says by then; its metadata records the choice and its cost."""
    _inject_compile(monkeypatch, eager_seconds_per_copy=1e-3)  # 8 images x 330 copies: no
    out = tmp_path / "out.tsv"
    assert main([*ARGS, "--out", str(out)]) == 0
    assert json.loads(Path(f"{out}.meta.json").read_text())["compile"] is False
    _inject_compile(monkeypatch, eager_seconds_per_copy=1.0)   # now compiling would pay
    full = tmp_path / "full.tsv"
    assert main([*ARGS, "--out", str(full)]) == 0
    meta = json.loads(Path(f"{full}.meta.json").read_text())
    assert meta["compile"] is True and meta["tuning"]["compile"]["decision"] == "on"
    assert meta["tuning"]["compile"]["copies"] == 8 * 330 and "compile_seconds" in meta
    # the eager run, interrupted, resumes eagerly although the estimate now says compile
    _interrupt(out, 2)
    FakeCompiled.calls = 0
    assert main([*ARGS, "--out", str(out), "--resume"]) == 0
    assert FakeCompiled.calls == 0 and json.loads(Path(f"{out}.meta.json").read_text())["compile"] is False
    # the compiled run, interrupted, resumes compiled although the estimate now says eager
    _interrupt(full, 5)
    _inject_compile(monkeypatch, eager_seconds_per_copy=1e-6)
    assert main([*ARGS, "--out", str(full), "--resume"]) == 0
    assert FakeCompiled.calls > 0 and json.loads(Path(f"{full}.meta.json").read_text())["compile"] is True
    assert _rows(out) == _rows(full)  # the fake compiled model is the eager one: same rows either way
