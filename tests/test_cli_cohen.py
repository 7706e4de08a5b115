"""Cohen et al.'s command line: `fastsmooth certify DATASET CHECKPOINT SIGMA OUTFILE [--N0 --N ...]`
and `fastsmooth predict ...` read their checkpoints and write their columns (issue 6, part 2)."""

import datetime
import re

import torch

from fastsmooth.cli import main
from fastsmooth.models import get_architecture
from test_data import _write_cifar


def _cohen_checkpoint(path):
    torch.manual_seed(0)
    model = get_architecture("cifar_resnet20", "cifar10")
    torch.save({"epoch": 90, "arch": "cifar_resnet20", "state_dict": model.state_dict()}, path)


def _parse_timedelta(text):
    h, m, s = text.split(":")
    return datetime.timedelta(hours=int(h), minutes=int(m), seconds=float(s))


def test_cohen_positional_certify_and_predict(tmp_path, monkeypatch):
    _write_cifar(tmp_path / "dataset_cache", n=3)
    monkeypatch.chdir(tmp_path)  # Cohen's scripts read CIFAR-10 from ./dataset_cache
    ckpt = tmp_path / "checkpoint.pth.tar"
    _cohen_checkpoint(ckpt)
    out = tmp_path / "certify.tsv"
    rc = main(["certify", "cifar10", str(ckpt), "0.25", str(out), "--N0", "20", "--N", "200",
               "--batch", "64", "--skip", "1", "--max", "2", "--no-progress"])
    assert rc == 0
    lines = out.read_text().splitlines()
    assert lines[0].split("\t")[:6] == ["idx", "label", "predict", "radius", "correct", "time"]
    rows = [line.split("\t") for line in lines[1:]]
    assert [r[0] for r in rows] == ["0", "1"]  # Cohen's loop stops at index --max
    for row in rows:
        assert row[3] == f"{float(row[3]):.3}"          # radius as "{:.3}"
        assert _parse_timedelta(row[5]).total_seconds() >= 0  # time as a timedelta string
        assert re.fullmatch(r"-?\d+", row[2]) and row[4] in ("0", "1")

    out = tmp_path / "predict.tsv"
    rc = main(["predict", "cifar10", str(ckpt), "0.25", str(out), "--N", "100", "--batch", "50",
               "--max", "2", "--no-progress"])
    assert rc == 0
    lines = out.read_text().splitlines()
    assert lines[0].split("\t") == ["idx", "label", "predict", "correct", "time"]
    assert len(lines) == 3
