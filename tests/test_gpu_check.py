"""bench/gpu_check is ready for a GPU (issue 15): the script parses and lists its steps (--dry-run),
and the engine checks it runs (bench/gpu_engine.py) work here at small sizes on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def test_gpu_check_parses_and_lists_its_steps(tmp_path):
    script = REPO / "bench" / "gpu_check"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    proc = subprocess.run([str(script), "--dry-run"], capture_output=True, text=True, timeout=60,
                          env=dict(ENV, GPU_CHECK_LOG_DIR=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for step in ("tests:", "kernels:", "engine:", "bench:", "torchrun:", "single:", "rows:"):
        assert f"[dry-run] {step}" in out, out
    assert "torch.distributed.run --standalone --nproc_per_node=2" in out
    assert "batch-sweep" in out and "sequential certification (issue 13)" in out


def test_gpu_engine_batch_sweep_runs_on_the_cpu(tmp_path):
    out = tmp_path / "sweep.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_engine.py"), "batch-sweep", "--device", "cpu",
                           "--arch", "cnn", "--dataset", "digits", "--copies", "300", "--no-compile",
                           "--json", str(out)], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["batch"] == 1000 and record["certify"][0]["mode"] == "eager"
    assert record["certify"][0]["seconds"] > 0 and "certify one image" in proc.stdout


def test_gpu_engine_compare_rows(tmp_path):
    a, b, c = tmp_path / "a.tsv", tmp_path / "b.tsv", tmp_path / "c.tsv"
    a.write_text("idx\tlabel\tpredict\ttime\n0\t1\t1\t0.5\n1\t2\t-1\t0.7\n")
    b.write_text("idx\tlabel\tpredict\ttime\n0\t1\t1\t0.9\n1\t2\t-1\t0.1\n")   # time differs only
    c.write_text("idx\tlabel\tpredict\ttime\n0\t1\t1\t0.5\n1\t2\t2\t0.7\n")
    run = [sys.executable, str(REPO / "bench" / "gpu_engine.py"), "compare-rows"]
    assert subprocess.run([*run, str(a), str(b)], capture_output=True, env=ENV).returncode == 0
    different = subprocess.run([*run, str(a), str(c)], capture_output=True, text=True, env=ENV)
    assert different.returncode == 1 and "DIFFERENT" in different.stdout
