"""`fastsmooth analyze` and the result reader: hand-computed figures on hand-written files."""

import csv
import io
import json
import math

import numpy as np
import pytest

from fastsmooth import analyze
from fastsmooth.results import ResultsFormatError, parse_time, read_results

# Cohen's certify.py: radius "{:.3}", time str(timedelta). m = 6; correct radii 0.5, 1.2, 0.25, 0.0
COHEN = """idx\tlabel\tpredict\tradius\tcorrect\ttime
0\t3\t3\t0.5\t1\t0:00:01.500000
10\t2\t2\t1.2\t1\t0:00:02
20\t1\t-1\t0.0\t0\t0:00:01.250000
30\t0\t7\t0.8\t0\t0:00:01
40\t5\t5\t0.25\t1\t1 day, 0:00:01
50\t4\t4\t0.0\t1\t0:00:01
"""
# Cohen's own radius "%.4f" and time in float seconds, plus fastsmooth's comment lines and extra
# columns. m = 4; correct radii 0.3, 2.0; one wrong, one abstention.
FASTSMOOTH = """# fastsmooth certify
# noise: {"name": "gaussian", "sigma": 0.5}
# alpha = 0.01
idx\tlabel\tpredict\tradius\tcorrect\ttime\tp_lower\tn_a\tn\tnorm
0\t1\t1\t0.3000\t1\t1.2345\t0.617911\t700\t1000\tl2

1\t2\t2\t2.0000\t1\t0.5\t0.977250\t990\t1000\tl2
2\t3\t4\t0.1000\t0\t0.5\t0.539828\t560\t1000\tl2
3\t4\t-1\t0.0000\t0\t0.5\t0.000000\t300\t1000\tl2
"""
# Cohen's predict.py: no radius column
PREDICT = """idx\tlabel\tpredict\tcorrect\ttime
0\t1\t1\t1\t0:00:00.100000
1\t2\t-1\t0\t0:00:00.100000
2\t3\t3\t1\t0:00:00.100000
3\t4\t0\t0\t0:00:00.100000
"""


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name, text in (("a.tsv", COHEN), ("b.tsv", FASTSMOOTH), ("p.tsv", PREDICT)):
        paths[name] = tmp_path / name
        paths[name].write_text(text)
    return paths


def _csv(capsys, argv):
    assert analyze.main(argv + ["--table", "csv"]) == 0
    out = capsys.readouterr().out
    return {row["file"]: row for row in csv.DictReader(io.StringIO(out))}


def test_reader_both_cohen_formats_and_fastsmooth(files):
    a = read_results(str(files["a.tsv"]))
    assert [r.idx for r in a] == [0, 10, 20, 30, 40, 50]
    assert [r.radius for r in a] == [0.5, 1.2, 0.0, 0.8, 0.25, 0.0]
    assert [r.time for r in a] == [1.5, 2.0, 1.25, 1.0, 86401.0, 1.0]
    assert a.rows[2].abstained and not a.rows[0].abstained and a.rows[3].correct is False
    b = read_results(str(files["b.tsv"]))
    assert len(b) == 4 and b.rows[0].time == 1.2345 and b.rows[1].radius == 2.0
    assert b.rows[0].extra == {"p_lower": "0.617911", "n_a": "700", "n": "1000", "norm": "l2"}
    assert b.metadata["alpha"] == 0.01 and b.metadata["noise"] == {"name": "gaussian", "sigma": 0.5}
    p = read_results(str(files["p.tsv"]))
    assert not p.has_radius and p.rows[0].radius is None
    assert parse_time("0:01:02.5") == 62.5 and parse_time("3.25") == 3.25


def test_reader_tolerates_torn_last_line_and_repeated_header(tmp_path):
    path = tmp_path / "running.tsv"
    path.write_text(COHEN + "idx\tlabel\tpredict\tradius\tcorrect\ttime\n60\t1\t1\t0.4\t1\t0:00:01\n70\t1\t1\t0.")
    rows = read_results(str(path)).rows
    assert [r.idx for r in rows][-2:] == [50, 60]


def test_side_metadata_file(files):
    (files["a.tsv"].parent / "a.tsv.meta.json").write_text(json.dumps({"alpha": 0.05, "norm": "l2"}))
    assert read_results(str(files["a.tsv"])).metadata == {"alpha": 0.05, "norm": "l2"}


def test_hand_computed_figures(files, capsys):
    table = _csv(capsys, [str(files["a.tsv"]), "--radii", "0", "0.25", "0.5", "1", "1.5"])
    row = table["a.tsv"]
    assert int(row["n"]) == 6
    assert float(row["abstain"]) == pytest.approx(1 / 6, abs=1e-6)
    assert float(row["ACR"]) == pytest.approx((0.5 + 1.2 + 0.25 + 0.0) / 6, abs=1e-6)
    got = [float(row[f"r={r}"]) for r in ("0", "0.25", "0.5", "1", "1.5")]
    assert got == pytest.approx([4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0], abs=1e-6)

    b = read_results(str(files["b.tsv"]))
    assert list(analyze.certified_accuracy(b, [0, 0.3, 0.31, 2.0, 2.01])) == [0.5, 0.5, 0.25, 0.25, 0.0]
    assert analyze.average_certified_radius(b) == pytest.approx((0.3 + 2.0) / 4)
    assert analyze.abstention_rate(b) == 0.25


def test_high_probability_bound(files, capsys):
    a = read_results(str(files["a.tsv"]))
    # P(Binomial(6, 0.001) >= 1) = 0.006 > 0.001 >= P(... >= 2) = 1.5e-5: at most q = 1 failure
    assert analyze.failure_quantile(6, 0.001, 0.001) == 1
    hp = analyze.high_prob_accuracy(a, [0, 0.25, 0.5, 1.0], alpha=0.001, rho=0.001)
    assert list(hp) == pytest.approx([3 / 6, 2 / 6, 1 / 6, 0.0])
    log = math.log(1000)
    cohen = 4 / 6 - 0.001 - math.sqrt(0.001 * 0.999 * log / 6) - log / 18
    assert analyze.high_prob_accuracy(a, [0], 0.001, 0.001, method="cohen")[0] == pytest.approx(cohen)
    # alpha from the file's metadata (b.tsv says 0.01): P(Binomial(4, 0.01) >= 2) = 5.9e-4 <= 0.001
    table = _csv(capsys, [str(files["b.tsv"]), "--radii", "0", "--high-prob"])
    assert float(table["b.tsv (high-prob)"]["r=0"]) == pytest.approx((2 - 1) / 4)


def test_envelope_and_predict_file(files, capsys):
    argv = [str(files["a.tsv"]), str(files["b.tsv"]), str(files["p.tsv"]), "--radii", "0", "0.25", "0.5", "1",
            "--envelope"]
    table = _csv(capsys, argv)
    env = [float(table["envelope"][f"r={r}"]) for r in ("0", "0.25", "0.5", "1")]
    assert env == pytest.approx([4 / 6, 1 / 2, 1 / 3, 1 / 4], abs=1e-6)
    # integral of max(acc_a, acc_b): 0.25*1/2 + 0.05*1/2 + 0.2*1/3 + 0.7*1/4 + 0.8*1/4
    assert float(table["envelope"]["ACR"]) == pytest.approx(0.125 + 0.025 + 0.2 / 3 + 0.175 + 0.2, abs=1e-6)
    # the PREDICT file: accuracy at r = 0 only, no ACR
    assert float(table["p.tsv"]["r=0"]) == 0.5 and table["p.tsv"]["r=0.25"] == "-" and table["p.tsv"]["ACR"] == "-"
    assert float(table["p.tsv"]["abstain"]) == 0.25


def test_markdown_and_latex_tables(files, capsys):
    assert analyze.main([str(files["a.tsv"]), str(files["b.tsv"]), "--radii", "0", "0.5"]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0] == "| file | n | copies | abstain | ACR | r=0 | r=0.5 |"
    # the best file per radius in bold; Cohen's file does not record its copies, b.tsv's n column does
    assert md[2] == "| a.tsv | 6 | - | 0.167 | 0.325 | **0.667** | **0.333** |"
    assert md[3] == "| b.tsv | 4 | 4,000 | 0.250 | 0.575 | 0.500 | 0.250 |"
    assert analyze.main([str(files["a.tsv"]), "--radii", "0.5", "--table", "latex", "--labels", "sigma_0.25"]) == 0
    tex = capsys.readouterr().out
    assert r"\begin{tabular}" in tex and r"sigma\_0.25 & 6 & - & 0.167 & 0.325 & 0.333 \\" in tex


def test_default_radii(files):
    a = read_results(str(files["a.tsv"]))
    assert analyze.auto_radii([a]) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert analyze.auto_radii([a], max_radius=10.0) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]


def test_plot_is_a_valid_png(files, tmp_path, capsys):
    import matplotlib.image

    out = tmp_path / "curves.png"
    argv = [str(files["a.tsv"]), str(files["b.tsv"]), str(files["p.tsv"]), "--plot", str(out),
            "--envelope", "--high-prob", "--table", "none"]
    assert analyze.main(argv) == 0
    assert capsys.readouterr().out == ""
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(str(out))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert np.ptp(image[..., :3]) > 0  # not a blank canvas


def test_through_the_cli(files, capsys):
    from fastsmooth.cli import main

    assert main(["analyze", str(files["a.tsv"]), "--radii", "0", "--table", "csv"]) == 0
    assert "a.tsv,6," in capsys.readouterr().out


@pytest.mark.parametrize("content", [
    None,                                                          # missing
    "",                                                            # empty: no header
    "a\tb\tc\n1\t2\t3\n",                                          # not a result file
    "idx\tlabel\tpredict\tradius\tcorrect\ttime\n",                # header only: no rows
    "idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\tbig\t1\t0:00:01\n1\t1\t1\t0.5\t1\t1\n",
    "idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\n1\t1\t1\t0.5\t1\t1\n",
    "idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\tmaybe\t1\n",
    b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe",                           # binary
])
def test_bad_file_exits_2_with_one_line(tmp_path, capsys, content):
    path = tmp_path / "bad.tsv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert analyze.main([str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastsmooth analyze: error:") and "bad.tsv" in lines[0]


def test_directory_and_bad_arguments_exit_2(tmp_path, files, capsys):
    assert analyze.main([str(tmp_path)]) == 2
    assert analyze.main([str(files["a.tsv"]), "--radii", "-1"]) == 2
    assert analyze.main([str(files["a.tsv"]), "--labels", "x", "y"]) == 2
    assert analyze.main([str(files["a.tsv"]), "--plot", str(tmp_path / "no" / "such" / "dir.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("fastsmooth analyze: error:") for line in err)


def test_format_error_is_a_value_error(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text("idx\tlabel\n")
    with pytest.raises(ResultsFormatError, match="lacks the column"):
        read_results(str(path))


def test_printed_radius_and_bound_never_exceed_the_certified_values():
    from fastsmooth.results import format_probability, format_radius

    for value in (0.2536, 0.25, 1.0, 3.8114, 1.23456e-4, 12.345, 0.999999, 2.0 / 3.0):
        assert float(format_radius(value, cohen=True)) <= value
        assert float(format_radius(value)) <= value
        assert float(format_probability(value / 4)) <= value / 4
    assert format_radius(0.2536, cohen=True) == "0.253" and format_radius(0.0, cohen=True) == "0.0"


def test_files_certified_at_target_radii(tmp_path, capsys):
    """A `certify --radii` file: its copies counted with n0 from the metadata, its targets in the
    default radii, and a note that between targets its figures are lower bounds."""
    path = tmp_path / "radii.tsv"
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\tp_lower\tn_a\tn\tnorm\n"
                    "0\t1\t1\t0.300000\t1\t0.1\t0.9\t6000\t6100\tl2\n"
                    "1\t2\t2\t0.100000\t1\t0.1\t0.7\t900\t1000\tl2\n"
                    "2\t3\t-1\t0.000000\t0\t0.1\t0.4\t200\t500\tl2\n")
    (tmp_path / "radii.tsv.meta.json").write_text(json.dumps({"mode": "radii", "radii": [0.1, 0.3], "n0": 100}))
    results = read_results(str(path))
    assert analyze.copies_used(results) == 6100 + 1000 + 500 + 3 * 100
    assert analyze.target_radii(results) == [0.1, 0.3]
    assert analyze.auto_radii([results]) == [0.0, 0.1, 0.25, 0.3]
    assert analyze.main([str(path), "--table", "csv"]) == 0
    captured = capsys.readouterr()
    table = {row["file"]: row for row in csv.DictReader(io.StringIO(captured.out))}
    assert table["radii.tsv"]["copies"] == "7900" and float(table["radii.tsv"]["r=0.3"]) == pytest.approx(1 / 3)
    assert "certified at target radii 0.1 0.3" in captured.err and "lower bounds" in captured.err
