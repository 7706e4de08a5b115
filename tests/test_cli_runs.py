"""Runs that lose nothing (issue 7 parts 1-2): `--resume` after `kill -9`, resume from the part files
of a run of many processes, and `torchrun --nproc_per_node=2` (gloo, this CPU). Every final file
must equal an uninterrupted single-process run with the same seed, in every column but time.

The model is `_cli_models:cnn` (fixed random weights; $FASTSMOOTH_TEST_SLEEP slows it down so that
a run can be killed in its middle), the data the 8x8 digits: small enough for seconds per run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastsmooth import Gaussian, Smooth, data
from fastsmooth.cli import main
from fastsmooth.models import get_architecture
from fastsmooth.results import UNCHECKED_META, read_results
from fastsmooth.train import save_checkpoint

import _cli_models

REPO = Path(__file__).resolve().parents[1]
IMAGES = 60
ARGS = ["certify", "--dataset", "digits", "--model", "_cli_models:cnn", "--samples", "300", "--n0", "30",
        "--batch", "100", "--max-index", str(IMAGES), "--sigma", "0.25", "--seed", "7", "--no-progress"]
PREDICT_ARGS = ["predict", "--dataset", "digits", "--model", "_cli_models:cnn", "--samples", "200",
                "--batch", "100", "--max-index", "12", "--no-progress"]


def _env(**extra):
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **extra)


def _rows(path) -> list:
    """The lines of a result file without the time column (header included)."""
    lines = Path(path).read_text().splitlines()
    drop = lines[0].split("\t").index("time")
    return ["\t".join(f for i, f in enumerate(line.split("\t")) if i != drop) for line in lines]


def _run(argv):
    assert main([str(a) for a in argv]) == 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted single-process run (certify and predict)."""
    root = tmp_path_factory.mktemp("reference")
    _run([*ARGS, "--out", root / "ref.tsv"])
    _run([*PREDICT_ARGS, "--out", root / "pred.tsv"])
    rows = _rows(root / "ref.tsv")
    assert len(rows) == IMAGES + 1 and [int(r.split("\t")[0]) for r in rows[1:]] == list(range(IMAGES))
    return root


def _lines(path) -> list:
    return Path(path).read_text().splitlines()


def _leftovers(out: Path) -> list:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name + ".rank"))


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------
def _kill_9_after_3_rows(args, out: Path, tmp_path: Path, images: int) -> list:
    """Start `fastsmooth ARGS --out OUT` on a slowed model, kill -9 it once OUT has 3 rows; the lines
    of OUT as the kill left them."""
    log = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "fastsmooth", *args, "--out", str(out)], cwd=tmp_path,
                            env=_env(FASTSMOOTH_TEST_SLEEP="0.02"), stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 4:  # header + 3 rows
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"the run ended before it could be killed: {(tmp_path / 'stderr.txt').read_text()}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    killed = _lines(out)
    assert 4 <= len(killed) < images + 1
    return killed


def test_resume_after_kill_9(reference, tmp_path):
    out = tmp_path / "out.tsv"
    killed = _kill_9_after_3_rows(ARGS, out, tmp_path, IMAGES)
    with open(out, "ab") as f:  # the image in progress at the kill: a torn line, never a result
        f.write(b"59\t3\t7\t1.5")
    _run([*ARGS, "--out", out, "--resume"])
    assert _rows(out) == _rows(reference / "ref.tsv")
    assert _lines(out)[: len(killed)] == killed  # the rows written before the kill are kept as they were
    meta = json.loads(Path(f"{out}.meta.json").read_text())
    assert meta["seed"] == 7 and meta["model"] == "_cli_models:cnn"
    assert meta["micro_batch"] == 0 and meta["precision"] == "fp32"  # "auto" resolved: a small model, whole batches


def test_dataset_names_as_the_data_module_takes_them(reference, tmp_path):
    """--dataset accepts what fastsmooth.data does (any case, aliases) and records the canonical name."""
    out = tmp_path / "cert.tsv"
    _run([*[("Digits" if a == "digits" else a) for a in ARGS], "--out", out])
    assert _rows(out) == _rows(reference / "ref.tsv")
    assert json.loads(Path(f"{out}.meta.json").read_text())["dataset"] == "digits"


def test_resume_predict_from_a_torn_file(reference, tmp_path):
    out = tmp_path / "pred.tsv"
    lines = _lines(reference / "pred.tsv")
    out.write_text("\n".join(lines[:5]) + "\n" + lines[5][:7])  # 4 rows and a torn fifth
    shutil.copy(reference / "pred.tsv.meta.json", f"{out}.meta.json")
    _run([*PREDICT_ARGS, "--out", out, "--resume"])
    assert _rows(out) == _rows(reference / "pred.tsv")


def _craft_interrupted_run(reference: Path, out: Path) -> None:
    """The remains of a killed run of several processes: a merged OUT with a few rows, part files
    of ranks 0 and 3 (rows in the order their processes took them, a torn last line, a row that
    is also in OUT), and the metadata side file."""
    header, *rows = _lines(reference / "ref.tsv")
    by_index = {int(r.split("\t")[0]): r for r in rows}
    out.write_text("\n".join([header] + [by_index[i] for i in range(5)]) + "\n")
    (out.parent / f"{out.name}.rank0.part").write_text(
        "\n".join([header, by_index[23], by_index[20], by_index[21]]) + "\n" + by_index[22][:9])
    (out.parent / f"{out.name}.rank3.part").write_text(
        "\n".join([header, by_index[41], by_index[2], by_index[40]]) + "\n")
    shutil.copy(reference / "ref.tsv.meta.json", f"{out}.meta.json")


def test_resume_from_the_parts_of_many_processes(reference, tmp_path):
    out = tmp_path / "out.tsv"
    _craft_interrupted_run(reference, out)
    _run([*ARGS, "--out", out, "--resume"])
    assert _rows(out) == _rows(reference / "ref.tsv")
    assert _leftovers(out) == []


def test_resume_refuses_other_settings(reference, tmp_path):
    out = tmp_path / "out.tsv"
    _craft_interrupted_run(reference, out)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    args = [a if a != "7" else "8" for a in ARGS]  # another seed
    from test_cli_errors import run_cli

    rc, _, stderr = run_cli([*args, "--out", out, "--resume"])
    assert rc == 2 and "different settings (seed=7)" in stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# --------------------------------------------------------------------------------------------
# Many processes
# --------------------------------------------------------------------------------------------
def test_grouping_does_not_change_certificates():
    """What a rank certifies depends on which images it took and how they were grouped into
    batches; the certificates must not."""
    dataset = data.get_dataset("digits")
    items = [(i, dataset[i][0]) for i in range(12)]
    smooth = Smooth(_cli_models.cnn(), 10, Gaussian(sigma=0.25), backend="torch", precision="fp32", seed=3)
    kw = dict(n0=30, n=200, alpha=0.001)
    whole = {c.image_index: c for c in smooth.certify_many(items, batch_size=100, **kw)}
    rank0 = list(smooth.certify_many(items[1::2][::-1], batch_size=64, images_per_group=5, **kw))
    rank1 = list(smooth.certify_many([items[i] for i in (8, 0, 4, 10, 2, 6)], batch_size=999,
                                     images_per_group=1, **kw))
    for c in rank0 + rank1:
        w = whole[c.image_index]
        assert torch.equal(c.counts0, w.counts0) and torch.equal(c.counts, w.counts)
        assert (c.prediction, c.radius, c.p_lower) == (w.prediction, w.radius, w.p_lower)
    assert sorted(c.image_index for c in rank0 + rank1) == list(range(12))


def _torchrun(tmp_path, *args, ok=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastsmooth", *map(str, args)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180)
    if not ok:
        return proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"(\d+) new rows from 2 processes \(rank 0: (\d+), rank 1: (\d+)\)", proc.stderr)
    assert m, proc.stderr[-3000:]
    return [int(g) for g in m.groups()]


def test_torchrun_two_processes_equal_one(reference, tmp_path):
    out = tmp_path / "out.tsv"
    total, rank0, rank1 = _torchrun(tmp_path, *ARGS, "--out", out)
    assert total == IMAGES and rank0 > 0 and rank1 > 0  # both processes took images
    assert _rows(out) == _rows(reference / "ref.tsv")
    assert _leftovers(out) == []
    meta = json.loads(Path(f"{out}.meta.json").read_text())
    ref_meta = json.loads(Path(reference / "ref.tsv.meta.json").read_text())
    # every setting equal; the information beside them (start time, compile cost, timings) may differ
    assert {k: v for k, v in meta.items() if k not in UNCHECKED_META} == \
        {k: v for k, v in ref_meta.items() if k not in UNCHECKED_META}


def test_torchrun_resumes_an_interrupted_run(reference, tmp_path):
    out = tmp_path / "out.tsv"
    _craft_interrupted_run(reference, out)
    total, _, _ = _torchrun(tmp_path, *ARGS, "--out", out, "--resume")
    assert total == IMAGES - 10  # rows 0-4, 20, 21, 23, 40, 41 were there; 22 was torn
    assert _rows(out) == _rows(reference / "ref.tsv")
    assert _leftovers(out) == []


def test_torchrun_failure_stops_every_process(tmp_path):
    """A model whose logits are NaN: every process stops with the one-line error (none waits
    forever for the others), and a run that failed before its first row leaves no file."""
    torch.manual_seed(0)
    model = get_architecture("cnn", "digits")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    save_checkpoint(tmp_path / "nan.pt", model, "cnn", 0, dataset="digits")
    out = tmp_path / "out.tsv"
    proc = _torchrun(tmp_path, "certify", "--dataset", "digits", "--model", tmp_path / "nan.pt", "--samples", "50",
                     "--n0", "10", "--batch", "100", "--max-index", "8", "--out", out, "--no-progress", ok=False)
    assert proc.returncode != 0
    assert "fastsmooth certify: error: the model returned NaN or inf logits" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.pt"]


# --------------------------------------------------------------------------------------------
# Sequential certification (issue 13): the same rows under torchrun and after kill -9 / --resume
# --------------------------------------------------------------------------------------------
SEQUENTIAL_IMAGES = 40
_SEQUENTIAL_BASE = ["certify", "--dataset", "digits", "--model", "_cli_models:cnn", "--samples", "4000", "--n0", "30",
                    "--batch", "100", "--max-index", str(SEQUENTIAL_IMAGES), "--sigma", "0.25", "--seed", "7",
                    "--no-progress"]
SEQUENTIAL = {"radii": [*_SEQUENTIAL_BASE, "--radii", "0.1", "0.25", "0.5"],
              "sequential": [*_SEQUENTIAL_BASE, "--sequential", "--tolerance", "0.02"]}


@pytest.fixture(scope="module")
def sequential_reference(tmp_path_factory):
    """Uninterrupted single-process runs of both sequential modes."""
    root = tmp_path_factory.mktemp("sequential")
    for mode, args in SEQUENTIAL.items():
        _run([*args, "--out", root / f"{mode}.tsv"])
        rows = read_results(str(root / f"{mode}.tsv")).rows
        assert [r.idx for r in rows] == list(range(SEQUENTIAL_IMAGES))
        used = {int(r.extra["n"]) for r in rows}
        assert len(used) > 3 and max(used) <= 4000  # images stopped at different votes, never past the cap
    return root


@pytest.mark.parametrize("mode", list(SEQUENTIAL))
def test_sequential_metadata_and_mode_checked_on_resume(sequential_reference, mode, tmp_path):
    meta = json.loads(Path(sequential_reference / f"{mode}.tsv.meta.json").read_text())
    assert meta["mode"] == mode and meta["n"] == 4000 and "beta-binomial" in meta["bound"]
    assert meta.get("radii") == ([0.1, 0.25, 0.5] if mode == "radii" else None)
    out = tmp_path / "out.tsv"
    shutil.copy(sequential_reference / f"{mode}.tsv", out)
    shutil.copy(sequential_reference / f"{mode}.tsv.meta.json", f"{out}.meta.json")
    from test_cli_errors import run_cli

    other = SEQUENTIAL["sequential" if mode == "radii" else "radii"]
    rc, _, stderr = run_cli([*other, "--out", out, "--resume"])
    assert rc == 2 and f"different settings (mode='{mode}'" in stderr
    rc, _, stderr = run_cli([*ARGS, "--samples", "4000", "--out", out, "--resume"])  # fixed n: refused too
    assert rc == 2 and "different settings" in stderr
    # a fixed-n file written before the sequential modes (no "mode" recorded) is not resumed with them
    old = json.loads(Path(sequential_reference / f"{mode}.tsv.meta.json").read_text())
    for key in ("mode", "radii", "tolerance", "bound"):
        old.pop(key, None)
    Path(f"{out}.meta.json").write_text(json.dumps(old))
    rc, _, stderr = run_cli([*SEQUENTIAL[mode], "--out", out, "--resume"])
    assert rc == 2 and "different settings (mode='fixed')" in stderr


@pytest.mark.parametrize("mode", list(SEQUENTIAL))
def test_sequential_resume_after_kill_9(sequential_reference, mode, tmp_path):
    out = tmp_path / "out.tsv"
    killed = _kill_9_after_3_rows(SEQUENTIAL[mode], out, tmp_path, SEQUENTIAL_IMAGES)
    _run([*SEQUENTIAL[mode], "--out", out, "--resume"])
    assert _rows(out) == _rows(sequential_reference / f"{mode}.tsv")
    assert _lines(out)[: len(killed)] == killed


@pytest.mark.parametrize("mode", list(SEQUENTIAL))
def test_sequential_torchrun_two_processes_equal_one(sequential_reference, mode, tmp_path):
    out = tmp_path / "out.tsv"
    total, rank0, rank1 = _torchrun(tmp_path, *SEQUENTIAL[mode], "--out", out)
    assert total == SEQUENTIAL_IMAGES and rank0 > 0 and rank1 > 0
    assert _rows(out) == _rows(sequential_reference / f"{mode}.tsv")
    assert _leftovers(out) == []
