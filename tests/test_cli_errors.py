"""Bad input to `fastsmooth certify | predict` (issue 7 part 3-4): one line on standard error
(`fastsmooth certify: error: ...`), exit status 2, never a traceback, never a corrupt output file.

The table runs the CLI in this process (fast); one case runs it as a real subprocess. Hypothesis then
fuzzes the argument space: exit status 0 or 2, no traceback, and the output file either absent or a
valid TSV of the command's columns.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from fastsmooth.cli import main
from fastsmooth.models import get_architecture
from fastsmooth.results import CERTIFY_COLUMNS, PREDICT_COLUMNS, read_results
from fastsmooth.train import save_checkpoint

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MARKER = "fastsmooth-evil-ran"


class _Evil:
    """Pickled into a checkpoint: loading it with pickle would create the marker file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints (good, corrupt, mismatched, malicious, NaN, ...) and paths, written once."""
    root = tmp_path_factory.mktemp("cli_errors")
    torch.manual_seed(0)
    f = {"root": root}
    f["good"] = save_checkpoint(root / "good.pt", get_architecture("cnn", "digits"), "cnn", 0, dataset="digits")
    f["mnist"] = save_checkpoint(root / "mnist.pt", get_architecture("cnn", "mnist"), "cnn", 0, dataset="mnist")
    f["five"] = save_checkpoint(root / "five.pt", get_architecture("cnn", "digits", num_classes=5), "cnn", 0,
                                dataset="digits")
    nan = get_architecture("cnn", "digits")
    with torch.no_grad():
        for p in nan.parameters():
            p.fill_(float("nan"))
    f["nan"] = save_checkpoint(root / "nan.pt", nan, "cnn", 0, dataset="digits")
    ckpt = torch.load(f["good"], weights_only=True)
    torch.save(dict(ckpt, arch="transformer9000"), root / "arch.pt")
    f["arch"] = root / "arch.pt"
    (root / "corrupt.pt").write_bytes(b"\x80\x02this is not a checkpoint" * 10)
    f["corrupt"] = root / "corrupt.pt"
    torch.save({"arch": "cnn", "state_dict": {}, "payload": _Evil(root / MARKER)}, root / "evil.pt")
    f["evil"] = root / "evil.pt"
    (root / "existing.tsv").write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\tp_lower\tn_a\tn\tnorm\n"
                                      "0\t5\t-1\t0.000000\t0\t0.1\t0.2\t3\t10\tl2\n")
    f["existing"] = root / "existing.tsv"
    (root / "garbage.tsv").write_text("this is not\ta result file\n")
    f["garbage"] = root / "garbage.tsv"
    (root / "adir").mkdir()
    return f


def run_cli(argv):
    """(exit status, stdout, stderr) of `fastsmooth ARGV` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


BASE = ["--dataset", "digits", "--samples", "20", "--n0", "10", "--batch", "16", "--max", "2", "--no-progress"]

# (id, argv after `certify` with {placeholders}, expected text in the error line)
CASES = [
    ("unknown-noise", ["--model", "{good}", "--noise", "bogus"], "unknown noise 'bogus'"),
    ("unknown-arch", ["--model", "{arch}"], "unknown architecture 'transformer9000'"),
    ("unknown-dataset", ["--model", "{good}", "--dataset", "bogus"], "unknown dataset 'bogus'"),
    ("sigma-zero", ["--model", "{good}", "--sigma", "0"], "--sigma must be a finite number > 0"),
    ("sigma-negative", ["--model", "{good}", "--sigma", "-0.5"], "--sigma must be a finite number > 0"),
    ("sigma-nan", ["--model", "{good}", "--sigma", "nan"], "--sigma must be a finite number > 0"),
    ("scale-negative", ["--model", "{good}", "--scale", "-1"], "--scale must be a finite number > 0"),
    ("sigma-and-scale", ["--model", "{good}", "--sigma", "0.5", "--scale", "0.5"], "not allowed with"),
    ("cohen-sigma-and-scale", ["digits", "{good}", "0.5", "--scale", "0.5"], "drop --sigma / --scale"),
    ("k-zero", ["--model", "{good}", "--noise", "expinf", "--k", "0"], "--k must be a finite number > 0"),
    ("k-negative", ["--model", "{good}", "--noise", "expinf", "--k", "-2"], "--k must be a finite number > 0"),
    ("k-without-expinf", ["--model", "{good}", "--k", "2"], "--k is ExpInf's exponent"),
    ("alpha-zero", ["--model", "{good}", "--alpha", "0"], "--alpha must lie in (0, 1)"),
    ("alpha-one", ["--model", "{good}", "--alpha", "1"], "--alpha must lie in (0, 1)"),
    ("alpha-above", ["--model", "{good}", "--alpha", "1.5"], "--alpha must lie in (0, 1)"),
    ("alpha-nan", ["--model", "{good}", "--alpha", "nan"], "--alpha must lie in (0, 1)"),
    ("n0-zero", ["--model", "{good}", "--n0", "0"], "--n0 must be > 0"),
    ("n-zero", ["--model", "{good}", "--samples", "0"], "--samples must be > 0"),
    ("n-negative", ["--model", "{good}", "--N", "-5"], "--samples must be > 0"),
    ("batch-zero", ["--model", "{good}", "--batch", "0"], "--batch must be > 0"),
    ("n-not-int", ["--model", "{good}", "--samples", "1e3"], "invalid int value"),
    ("checkpoint-missing", ["--model", "{root}/nothere.pt"], "checkpoint file not found"),
    ("checkpoint-corrupt", ["--model", "{corrupt}"], "not a readable PyTorch checkpoint"),
    ("checkpoint-mismatched", ["--model", "{mnist}"], "shape mismatch"),
    ("checkpoint-malicious", ["--model", "{evil}"], "not a readable PyTorch checkpoint"),
    ("data-missing", ["--model", "{mnist}", "--dataset", "fashion-mnist", "--data-root", "{root}/nothere"],
     "directory not found"),
    ("classes-checkpoint", ["--model", "{five}"], "has 5 classes but data set digits has 10"),
    ("classes-width", ["--model", "_cli_models:three_logits"], "outputs 3 logits but data set digits has 10"),
    ("nonfinite-logits", ["--model", "{nan}"], "NaN or inf logits"),
    ("input-shape", ["--model", "_cli_models:flat_linear_100"], "rejects inputs of shape (1, 8, 8)"),
    ("forward-fails-on-batches", ["--model", "_cli_models:one_at_a_time"],
     "the model failed on a batch of inputs of shape ("),
    ("factory-missing-module", ["--model", "no_such_module_xyz:make"], "cannot import no_such_module_xyz"),
    ("factory-not-a-model", ["--model", "_cli_models:not_a_model"], "not a torch.nn.Module"),
    ("out-missing-directory", ["--model", "{good}", "--out", "{root}/nothere/out.tsv"], "does not exist"),
    ("out-is-directory", ["--model", "{good}", "--out", "{root}/adir"], "is a directory"),
    ("out-exists", ["--model", "{good}", "--out", "{existing}"], "exists; pass --resume"),
    ("resume-and-force", ["--model", "{good}", "--out", "{existing}", "--resume", "--force"], "exclude each other"),
    ("resume-without-out", ["--model", "{good}", "--resume"], "--resume needs --out"),
    ("resume-garbage", ["--model", "{good}", "--out", "{garbage}", "--resume"], "cannot resume"),
    ("device-unknown", ["--model", "{good}", "--device", "bogus"], "not a torch device"),
    ("cohen-no-sigma", ["digits", "{good}"], "DATASET CHECKPOINT SIGMA"),
    ("unknown-norm", ["--model", "{good}", "--norm", "l3"], "invalid choice"),
    ("radii-negative", ["--model", "{good}", "--radii", "0.25", "-1"], "--radii must be finite and >= 0"),
    ("radii-nan", ["--model", "{good}", "--radii", "nan"], "--radii must be finite and >= 0"),
    ("radii-empty", ["--model", "{good}", "--radii"], "expected at least one argument"),
    ("radii-and-sequential", ["--model", "{good}", "--radii", "0.25", "--sequential"], "not allowed with"),
    ("tolerance-zero", ["--model", "{good}", "--sequential", "--tolerance", "0"],
     "--tolerance must be a finite number > 0"),
    ("tolerance-alone", ["--model", "{good}", "--tolerance", "0.02"], "--tolerance is the stopping tolerance"),
]
if not torch.cuda.is_available():
    CASES.append(("device-cuda-absent", ["--model", "{good}", "--device", "cuda"], "not available here"))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(files, case, tmp_path):
    name, argv, expected = case
    out = tmp_path / "out.tsv"
    argv = [a.format(**files) for a in argv]
    if "--out" not in argv and "--resume" not in argv and argv[0] != "digits":
        argv += ["--out", str(out)]
    snapshot = {p: p.read_bytes() for p in files["root"].iterdir() if p.is_file()}
    rc, stdout, stderr = run_cli(["certify", *BASE, *argv])
    lines = stderr.strip().splitlines()
    assert rc == 2, (rc, stderr)
    assert len(lines) == 1 and lines[0].startswith("fastsmooth certify: error: "), stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in stderr and stdout == ""
    assert not out.exists() and not Path(f"{out}.meta.json").exists()  # nothing half-written
    for path, content in snapshot.items():
        assert path.read_bytes() == content, f"{path.name} was modified"
    assert not (files["root"] / MARKER).exists(), "the checkpoint's pickle ran code"
    if name == "out-exists":
        assert not Path(f"{files['existing']}.meta.json").exists()


def test_predict_shares_the_checks(files, tmp_path):
    base = [a for a in BASE if a not in ("--n0", "10")]
    rc, _, stderr = run_cli(["predict", *base, "--model", files["good"], "--alpha", "2", "--out", tmp_path / "p.tsv"])
    assert rc == 2 and stderr.startswith("fastsmooth predict: error: --alpha must lie in (0, 1)")
    assert not (tmp_path / "p.tsv").exists()


def test_error_line_from_a_real_process(files, tmp_path):
    """The same contract seen from outside: exit status 2 and one line, in a subprocess."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    proc = subprocess.run([sys.executable, "-m", "fastsmooth", "certify", "--model", "_cli_models:flat_linear_100",
                           "--out", str(tmp_path / "o.tsv"), *BASE], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "fastsmooth certify: error: the model rejects inputs of shape (1, 8, 8) (data set digits): "
        "mat1 and mat2 shapes cannot be multiplied (1x64 and 100x10)"]
    assert not (tmp_path / "o.tsv").exists()


def test_failure_after_rows_keeps_a_valid_resumable_file(files, tmp_path):
    """A model that turns non-finite on the second group of images: the rows already written stay,
    whole, and the file is a valid TSV (a --resume would continue from them)."""
    from fastsmooth import cli

    out = tmp_path / "o.tsv"
    calls = {"n": 0}
    original = cli._Guarded.forward

    def flaky(self, x):
        calls["n"] += 1
        logits = original(self, x)
        return logits * float("nan") if calls["n"] > 6 else logits

    cli._Guarded.forward = flaky
    try:
        rc, _, stderr = run_cli(["certify", "--model", files["good"], "--out", out, "--dataset", "digits",
                                 "--samples", "20", "--n0", "10", "--batch", "10", "--max", "8", "--no-progress"])
    finally:
        cli._Guarded.forward = original
    assert rc == 2 and "NaN or inf logits" in stderr
    results = read_results(str(out))
    assert results.columns == list(CERTIFY_COLUMNS) and 1 <= len(results) < 8


# --------------------------------------------------------------------------------------------
# Fuzzing the argument space
# --------------------------------------------------------------------------------------------
DIGITS_SIZE = {"test": 359, "train": 1438}


def pick(valid, invalid):
    """Mostly valid values (so that runs get past the first check), sometimes invalid ones."""
    return st.sampled_from(list(valid) * 3 + list(invalid))


SCALES = pick([1e-3, 0.25, 2.0], [-1.0, 0.0, math.nan, math.inf])
OPTIONS = {
    "--noise": pick(["gaussian", "laplace", "uniform", "expinf", "Laplace"], ["bogus"]),
    "--sigma": SCALES,
    "--scale": SCALES,
    "--k": pick([0.5, 1.0, 2.0], [-1.0, 0.0, math.nan]),
    "--alpha": pick([1e-12, 0.001, 0.5], [-0.1, 0.0, 1.0, 3.0, math.nan]),
    "--n0": st.integers(-1, 30),
    "--samples": st.integers(-1, 40),
    "--batch": st.integers(-1, 50),
    "--skip": st.integers(-1, 150),
    "--max": st.sampled_from([-1, 0, 1, 3]),
    "--split": pick(["train", "test"], ["valid"]),
    "--norm": pick(["l1", "l2", "linf"], ["l0"]),
    "--dataset": pick(["digits"], ["mnist", "bogus"]),
    "--precision": pick(["auto", "fp32", "bf16"], ["int8"]),
    "--seed": st.integers(-3, 2**40),
    "--device": pick(["cpu"], ["bogus"]),
    "--backend": pick(["auto", "torch"], ["cuda"]),
    "--radii": pick(["0.1", "0.5"], ["-1", "nan"]),
}


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["certify", "predict"]),
       options=st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.none(), max_size=6).flatmap(
           lambda keys: st.fixed_dictionaries({k: OPTIONS[k] for k in keys})),
       model=pick(["good", "good"], ["missing", "corrupt", "five", "nan", "_cli_models:three_logits"]),
       out=st.sampled_from(["fresh"] * 4 + ["existing"] * 2 + ["missing-dir", "none"]),
       flags=st.sampled_from([(False, False)] * 4 + [(True, False), (False, True), (True, True)]))
def test_fuzz_cli_arguments(files, command, options, model, out, flags):
    resume, force = flags
    if command == "predict":
        options = {k: v for k, v in options.items() if k not in ("--n0", "--norm", "--radii")}
    models = {"good": files["good"], "missing": files["root"] / "missing.pt", "corrupt": files["corrupt"],
              "five": files["five"], "nan": files["nan"]}
    options["--model"] = model
    for flag, value in (("--samples", 20), ("--n0", 10), ("--batch", 64)):  # bounded defaults
        if flag != "--n0" or command == "certify":
            options.setdefault(flag, value)
    options.setdefault("--max", 2)  # bounded: at most a few images unless --max is drawn
    if options.get("--max") in (-1, -2):
        options["--skip"] = max(options.get("--skip", 100), 100)
    argv = [command, "--no-progress"]
    for flag, value in options.items():
        argv += [flag, str(models.get(value, value))]
    columns = list(CERTIFY_COLUMNS if command == "certify" else PREDICT_COLUMNS)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("nothere/out.tsv" if out == "missing-dir" else "out.tsv")
        before = None
        if out == "existing":
            before = "\t".join(columns) + "\n"
            path.write_text(before)
        if out != "none":
            argv += ["--out", str(path)]
        argv += ["--resume"] * resume + ["--force"] * force
        rc, stdout, stderr = run_cli(argv)
        assert rc in (0, 2), (argv, rc, stderr)
        assert "Traceback" not in stderr, stderr
        if rc == 2:
            lines = stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"fastsmooth {command}: error: "), (argv, stderr)
        if out == "none":
            if rc == 0:
                assert stdout.splitlines()[0].split("\t") == columns
            return
        if path.exists():
            results = read_results(str(path))  # a valid TSV, whatever happened
            assert results.columns == columns
            assert len({r.idx for r in results}) == len(results)
            if rc == 0:  # every image asked for, once, in order
                size = DIGITS_SIZE[options.get("--split", "test")]
                stop = size if options["--max"] < 0 else min(size, options["--max"])
                assert [r.idx for r in results] == list(range(0, stop, int(options.get("--skip", 1))))
            if rc == 2 and before is not None and not resume:
                assert path.read_text() == before  # refused: the existing file is untouched
        else:
            assert rc == 2 or out == "missing-dir"
            assert not Path(f"{path}.meta.json").exists()
