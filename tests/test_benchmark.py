"""`fastsmooth bench` and fastsmooth.benchmark: behaviour at a tiny size (no timing assertions)."""

import json

import numpy as np
import pytest
import torch

from fastsmooth import benchmark, models
from fastsmooth.cli import main

TINY = ["--arch", "cnn", "--dataset", "mnist", "--copies", "40", "--n0", "8", "--batch", "16", "--rounds", "1",
        "--device", "cpu"]


def test_bench_prints_the_table(capsys, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for line in ("reference loop (Cohen et al.)", "bare model forward", "fastsmooth certify", "copies/s",
                 "reference / fastsmooth", "fastsmooth / bare", "machine :"):
        assert line in text
    record = json.loads(out.read_text())
    assert record["copies"] == 48 and record["n0"] == 8 and record["n"] == 40
    assert set(record["copies_per_s"]) == {"reference", "bare", "fastsmooth"}
    assert all(v > 0 for v in record["copies_per_s"].values())
    assert record["reference_over_fastsmooth"] > 0 and record["fastsmooth_over_bare"] > 0
    assert record["device_facts"]["device_type"] == "cpu"
    assert all(len(record["seconds"][m]) == 1 for m in benchmark.METHODS)


def test_bench_a_checkpoint_without_the_reference(capsys, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.save({"arch": "cnn", "dataset": "mnist", "state_dict": models.get_architecture("cnn", "mnist").state_dict()},
               path)
    args = ["bench", "--model", str(path), "--copies", "20", "--n0", "4", "--batch", "8", "--rounds", "1",
            "--precision", "fp32", "--no-reference", "--device", "cpu"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "model.pt (cnn, mnist)" in text and "fp32" in text
    assert "fastsmooth / bare" in text


@pytest.mark.slow  # inductor compiles C++ for the CPU: about 10 s here
def test_bench_compiled_engine_reports_its_one_time_cost(capsys, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--compile", "--no-reference", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["engine"]["compile"] is True and record["compile_seconds"] > 0
    assert "compiled" in record["configs"]["bare"] and "compiled" in record["configs"]["fastsmooth"]
    assert "compiled" not in record["configs"]["reference"]
    assert f"torch.compile (one-time cost {record['compile_seconds']:.1f} s" in text


def test_bench_the_users_own_model_by_factory(capsys, tmp_path):
    """`--model MODULE:FACTORY` as in certify (tests/_cli_models.py); --dataset fixes shape and classes."""
    out = tmp_path / "bench.json"
    args = ["bench", "--model", "_cli_models:cnn", "--dataset", "digits", "--copies", "40", "--n0", "8",
            "--batch", "16", "--rounds", "1", "--device", "cpu", "--json", str(out)]
    assert main(args) == 0
    assert "model   : _cli_models:cnn (digits), input 1x8x8, 10 classes" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["input_shape"] == [1, 8, 8] and all(v > 0 for v in record["copies_per_s"].values())
    assert main(args[:3] + args[5:]) == 2                             # no --dataset
    assert "_cli_models:cnn needs --dataset" in capsys.readouterr().err
    assert main(["bench", "--model", "_cli_models:three_logits", *args[3:]]) == 2
    assert "logits of shape (16, 3)" in capsys.readouterr().err


def test_bench_rejects_bad_sizes(capsys):
    assert main(["bench", *TINY[:-6], "--copies", "0"]) == 2
    assert "--copies must be > 0" in capsys.readouterr().err


def test_reference_loop_is_cohens_counting():
    assert benchmark.cohen_count_arr(np.array([0, 2, 2, 1]), 4).tolist() == [1, 1, 2, 0]
    model, k, shape, _ = benchmark.make_model("cnn", "mnist")
    w = benchmark.Workload("cnn", model, k, shape, n0=5, n=23, images=2, batch=10, device="cpu")
    r = benchmark.Runners(w)
    counts = r.reference()
    assert [int(c.sum()) for c in counts] == [5, 23, 5, 23]  # per image: n0 copies, then n
    certs = r.fastsmooth()
    assert [int(c.counts.sum()) for c in certs] == [23, 23]
    r.bare()
    assert r.reference_model is not model  # the engine's in-place conversion never reaches Cohen's copy


def test_measurement_keeps_warmup_apart():
    model, k, shape, _ = benchmark.make_model("cnn", "mnist")
    m = benchmark.Measurement(benchmark.Runners(benchmark.Workload("cnn", model, k, shape, n0=2, n=6, batch=4,
                                                                   device="cpu")))
    m.rounds(2, methods=("bare", "fastsmooth"))
    assert set(m.warmup_seconds) == {"bare", "fastsmooth"}
    assert len(m.seconds["bare"]) == 2 and "reference" not in m.seconds
    rec = m.record(facts={"device_type": "cpu"})
    assert rec["copies_per_s"]["reference"] is None and rec["reference_over_fastsmooth"] is None
    assert rec["fastsmooth_over_bare"] > 0
    with pytest.raises(ValueError):
        m.run("nope")


def test_ratios_best_median_and_paired():
    """Worked timings: the machine runs at half speed in the middle round. Best and median compare
    rounds apart; the paired ratio compares the two runs of each round."""
    model, k, shape, _ = benchmark.make_model("cnn", "mnist")
    m = benchmark.Measurement(benchmark.Runners(benchmark.Workload("cnn", model, k, shape, n0=2, n=6, batch=4,
                                                                   device="cpu")))
    m.seconds = {"reference": [4.0, 8.0, 4.0], "bare": [1.0, 2.0, 1.1], "fastsmooth": [1.05, 2.1, 1.05]}
    assert m.ratios("best")["fastsmooth_over_bare"] == pytest.approx(1.05)
    assert m.ratios("median")["fastsmooth_over_bare"] == pytest.approx(1.05 / 1.1)
    assert m.ratios("paired")["fastsmooth_over_bare"] == pytest.approx(1.05)  # median of 1.05, 1.05, 0.955
    assert m.ratios("paired")["reference_over_fastsmooth"] == pytest.approx(4.0 / 1.05)
    assert m.record(facts={})["ratios_paired"] == m.ratios("paired")


def test_rounds_alternate_the_order_of_the_methods():
    model, k, shape, _ = benchmark.make_model("cnn", "mnist")
    m = benchmark.Measurement(benchmark.Runners(benchmark.Workload("cnn", model, k, shape, n0=2, n=6, batch=4,
                                                                   device="cpu")))
    order = []
    m.run = order.append
    m.warmup_seconds = {"bare": 0.0, "fastsmooth": 0.0}
    m.rounds(2, methods=("bare", "fastsmooth"))
    assert order == ["bare", "fastsmooth", "fastsmooth", "bare"]


def test_bare_forward_runs_in_the_engines_resolved_configuration():
    model, k, shape, _ = benchmark.make_model("cifar_resnet20", "cifar10")
    r = benchmark.Runners(benchmark.Workload("r20", model, k, shape, n0=2, n=4, batch=4, device="cpu"))
    s = r.smooth.sampler
    assert s.dtype is not None and r.engine["precision"] in ("fp32", "bf16")
    assert r.buffer.dtype == s.dtype
    assert r.buffer.is_contiguous(memory_format=torch.channels_last) == s.channels_last
    r.fastsmooth()
    r.bare()
    assert r.buffer.dtype == s.dtype
