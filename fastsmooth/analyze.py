"""`fastsmooth analyze FILE.tsv [FILE.tsv ...]`: certified-accuracy tables and curves.

Reads result files of fastsmooth and of Cohen et al.'s / Salman et al.'s certify.py and predict.py
(``fastsmooth.results.read_results``) and reports, per file of m images:

* certified accuracy at radius r: the fraction of images with ``correct`` and ``radius >= r``
  (Cohen et al.'s "approximate certified test set accuracy"); at r = 0 it is the clean accuracy of
  the smoothed classifier. PREDICT files have no radius: only r = 0 is defined for them.
* its high-probability variant (``--high-prob``): a lower bound that holds with probability >= 1 - rho
  on the certified accuracy of the smoothed classifier itself on the same m test images, accounting
  for the certificates that are wrong. Each certificate fails (a wrong class, or a radius g does not
  have) with probability <= alpha, independently across images (fresh noise per image), so the
  number F of failures is dominated by Binomial(m, alpha). With q the (1 - rho) quantile of
  Binomial(m, alpha), P(F > q) <= rho, and on the complement at least count(r) - q images are truly
  certified: the bound is max(0, (count(r) - q) / m). This is the exact version of the argument of
  Cohen et al. 2019 (Appendix, "certified accuracy with high probability"), whose analyze.py replaces
  the binomial quantile by a Bernstein-type expression, mean - alpha - sqrt(alpha (1 - alpha)
  log(1/rho) / m) - log(1/rho) / (3m); ``--high-prob-method cohen`` reproduces that expression for
  comparison with their figures (its constants are smaller than those of Bernstein's inequality in
  its usual form, so prefer the default ``binomial``, which is exact and as tight or tighter).
  alpha is the per-certificate failure probability: ``--alpha``, else the file's metadata (``alpha``
  in ``FILE.tsv.meta.json``), else Cohen's default 0.001.
* ACR, the average certified radius: the mean over all m images of the radius when correct, 0
  otherwise (= the integral over r of the certified-accuracy curve).
* the abstention rate: the fraction of images with predict = -1.
* the copies: the noisy copies the file's certificates drew (model forwards), the ``n`` column
  summed plus ``n0`` per row when the metadata records it (selection included); PREDICT files: n
  per row. Sequential files (``--radii``, ``--sequential``) record the votes each image used.
* files certified at target radii (``fastsmooth certify --radii``, metadata ``mode: radii``): the
  radius column holds the largest target certified, so their certified accuracy is exact at the
  targets and a lower bound between them (their ACR that of the staircase); the default radii
  include their targets, and a note on standard error says so.
* with ``--envelope``, the outer envelope across files: at each r the best certified accuracy of any
  file (as in Cohen et al.'s figures over sigma). Choosing the best file per radius after the fact is
  a summary across classifiers, not the certified accuracy of any single one; its ACR is the integral
  of the envelope.

Exit status: 0, or 2 with one line on standard error for a missing, unreadable or malformed file
(or bad arguments, or an unwritable output).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from .results import Results, ResultsFormatError, read_results

DEFAULT_ALPHA = 0.001  # Cohen et al.'s certify.py default
MAX_AUTO_COLUMNS = 12
_NICE_STEPS = (0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0, 20.0, 25.0, 50.0, 100.0)


class AnalyzeError(Exception):
    """Bad input: one line on standard error, exit status 2."""


# -- figures ---------------------------------------------------------------------------------------

def certified_counts(results: Results, radii: Sequence[float]) -> np.ndarray:
    """Number of images with correct and radius >= r, for each r (int64). For a PREDICT file (no
    radius) the count at r = 0 is the number correct and r > 0 has no count (-1)."""
    radii = np.asarray(radii, dtype=np.float64)
    correct = np.array([row.correct for row in results.rows], dtype=bool)
    if not results.has_radius:
        return np.where(radii <= 0.0, int(correct.sum()), -1).astype(np.int64)
    radius = np.array([row.radius for row in results.rows], dtype=np.float64)
    ok = np.sort(radius[correct & ~np.isnan(radius)])  # one sorted search, not a radii x rows matrix
    return (len(ok) - np.searchsorted(ok, radii, side="left")).astype(np.int64)


def certified_accuracy(results: Results, radii: Sequence[float]) -> np.ndarray:
    """Certified accuracy at each radius (NaN where a PREDICT file has no radius)."""
    counts = certified_counts(results, radii)
    m = len(results.rows)
    return np.where(counts >= 0, counts / max(m, 1), np.nan)


def failure_quantile(m: int, alpha: float, rho: float) -> int:
    """The smallest q with P(Binomial(m, alpha) > q) <= rho."""
    from scipy.stats import binom

    return int(binom.ppf(1.0 - rho, m, alpha))


def high_prob_accuracy(results: Results, radii: Sequence[float], alpha: float, rho: float,
                       method: str = "binomial") -> np.ndarray:
    """Lower bound, holding with probability >= 1 - rho, on the certified accuracy over the test
    images (see the module docstring); clipped at 0. NaN where the count is undefined."""
    counts = certified_counts(results, radii)
    m = len(results.rows)
    if m == 0:
        return np.full(len(counts), np.nan)
    if method == "binomial":
        bound = (counts - failure_quantile(m, alpha, rho)) / m
    elif method == "cohen":
        log = math.log(1.0 / rho)
        bound = counts / m - alpha - math.sqrt(alpha * (1 - alpha) * log / m) - log / (3 * m)
    else:
        raise ValueError(f"unknown high-probability method {method!r}")
    return np.where(counts >= 0, np.maximum(bound, 0.0), np.nan)


def average_certified_radius(results: Results) -> float:
    """Mean over all images of the radius when correct, else 0 (NaN for a PREDICT file)."""
    if not results.has_radius or not results.rows:
        return math.nan
    return sum(row.radius for row in results.rows if row.correct) / len(results.rows)


def abstention_rate(results: Results) -> float:
    return sum(row.abstained for row in results.rows) / len(results.rows) if results.rows else math.nan


def copies_used(results: Results) -> Optional[int]:
    """Noisy copies behind the file's rows (None when the file does not record them)."""
    meta = results.metadata
    if not results.rows:
        return None
    if results.has_radius and "n" in results.columns:
        try:
            estimation = sum(int(row.extra["n"]) for row in results.rows)
        except (KeyError, ValueError):
            return None
        n0 = meta.get("n0")
        return estimation + (int(n0) * len(results.rows) if isinstance(n0, int) else 0)
    if not results.has_radius and isinstance(meta.get("n"), int):
        return int(meta["n"]) * len(results.rows)
    return None


def target_radii(results: Results) -> Optional[List[float]]:
    """The targets of a file certified with --radii (its metadata), else None."""
    radii = results.metadata.get("radii") if results.metadata.get("mode") == "radii" else None
    if not isinstance(radii, list) or not all(isinstance(r, (int, float)) for r in radii):
        return None
    return [float(r) for r in radii]


def envelope(curves: Sequence[np.ndarray]) -> np.ndarray:
    """The outer envelope: the best value of any curve at each radius (NaNs ignored)."""
    stacked = np.vstack([np.asarray(c, dtype=np.float64) for c in curves])
    out = np.full(stacked.shape[1], np.nan)
    defined = ~np.all(np.isnan(stacked), axis=0)
    out[defined] = np.nanmax(stacked[:, defined], axis=0)
    return out


def envelope_acr(all_results: Sequence[Results]) -> float:
    """Integral over r >= 0 of the envelope of the certified-accuracy curves (exact: the curves are
    step functions, constant between consecutive radii of the files)."""
    with_radius = [r for r in all_results if r.has_radius and r.rows]
    if not with_radius:
        return math.nan
    breaks = np.array(sorted({row.radius for r in with_radius for row in r.rows if row.correct and row.radius > 0}),
                      dtype=np.float64)
    best = np.max([certified_accuracy(r, breaks) for r in with_radius], axis=0)
    total, previous = 0.0, 0.0
    for b, value in zip(breaks.tolist(), best.tolist()):
        # On (previous, b] every curve equals its value at b.
        total += (b - previous) * value
        previous = b
    return total


@dataclass
class FileSummary:
    label: str
    results: Results
    alpha: float
    accuracy: np.ndarray
    high_prob: np.ndarray
    acr: float
    abstain: float
    copies: Optional[int] = None


def summarize(results: Results, label: str, radii: Sequence[float], alpha: float, rho: float,
              method: str = "binomial") -> FileSummary:
    return FileSummary(label, results, alpha, certified_accuracy(results, radii),
                       high_prob_accuracy(results, radii, alpha, rho, method),
                       average_certified_radius(results), abstention_rate(results), copies_used(results))


def auto_radii(all_results: Sequence[Results], max_radius: Optional[float] = None) -> List[float]:
    """0, step, 2 step, ... up to the largest radius certified (or ``max_radius``), with a step of
    0.25 or the first rounder one that keeps the table within MAX_AUTO_COLUMNS radii; and the
    targets of files certified at target radii."""
    if max_radius is None:
        radii = [row.radius for r in all_results if r.has_radius for row in r.rows if row.correct]
        max_radius = max(radii, default=0.0)
    targets = {r for results in all_results for r in (target_radii(results) or [])}
    if max_radius <= 0:
        return sorted({0.0} | targets)
    step = next((s for s in _NICE_STEPS if max_radius / s < MAX_AUTO_COLUMNS), None)
    if step is None:
        step = max_radius / (MAX_AUTO_COLUMNS - 1)
    count = int(math.floor(max_radius / step + 1e-9))
    return sorted({round(k * step, 10) for k in range(count + 1)} | targets)


# -- tables ----------------------------------------------------------------------------------------

def _fmt(value: float, digits: int) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _radius_header(r: float) -> str:
    return f"r={r:g}"


def table_rows(summaries: Sequence[FileSummary], radii: Sequence[float], high_prob: bool,
               envelope_row: bool, all_results: Sequence[Results]):
    """(header, rows) with rows of (label, n, copies, abstain, ACR, values per radius) as floats/None."""
    header = ["file", "n", "copies", "abstain", "ACR"] + [_radius_header(r) for r in radii]
    rows = []
    for s in summaries:
        rows.append((s.label, len(s.results), s.copies, s.abstain, s.acr, list(s.accuracy)))
        if high_prob:
            rows.append((f"{s.label} (high-prob)", len(s.results), None, None, None, list(s.high_prob)))
    if envelope_row:
        rows.append(("envelope", None, None, None, envelope_acr(all_results),
                     list(envelope([s.accuracy for s in summaries]))))
    return header, rows


def _best_per_column(rows, count: int) -> list:
    """Per radius, the set of plain (not high-prob, not envelope) rows with the best value (ties
    all marked); empty sets with a single file."""
    plain = [i for i, row in enumerate(rows) if not row[0].endswith("(high-prob)") and row[0] != "envelope"]
    if len(plain) < 2:
        return [set() for _ in range(count)]
    best = []
    for j in range(count):
        values = {i: rows[i][5][j] for i in plain if not math.isnan(rows[i][5][j])}
        top = max(values.values(), default=None)
        best.append({i for i, v in values.items() if v == top})
    return best


def _latex_escape(text: str) -> str:
    out = []
    for ch in text:
        if ch in "&%$#_{}":
            out.append("\\" + ch)
        elif ch == "\\":
            out.append(r"\textbackslash{}")
        elif ch == "~":
            out.append(r"\textasciitilde{}")
        elif ch == "^":
            out.append(r"\textasciicircum{}")
        else:
            out.append(ch)
    return "".join(out)


def render_table(summaries, radii, fmt: str, digits: int = 3, high_prob: bool = False,
                 envelope_row: bool = False, all_results=()) -> str:
    header, rows = table_rows(summaries, radii, high_prob, envelope_row, all_results)
    best = _best_per_column(rows, len(radii))

    def cells(i, row, digits, grouped=True):
        label, n, copies, abstain, acr, values = row
        copies = "-" if copies is None else (f"{copies:,}" if grouped else str(copies))
        if label == "envelope" or label.endswith("(high-prob)"):
            copies = ""
        return [label, "" if n is None else str(n), copies, _fmt(abstain, digits), _fmt(acr, digits)] + \
            [_fmt(v, digits) for v in values]

    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        for i, row in enumerate(rows):
            writer.writerow(cells(i, row, max(digits, 6), grouped=False))
        return buf.getvalue()
    if fmt == "md":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for i, row in enumerate(rows):
            c = cells(i, row, digits)
            for j in range(len(radii)):
                if i in best[j]:
                    c[5 + j] = f"**{c[5 + j]}**"
            lines.append("| " + " | ".join(c) + " |")
        return "\n".join(lines) + "\n"
    if fmt == "latex":
        head = ["file", "$n$", "copies", "abstain", "ACR"] + [f"$r = {r:g}$" for r in radii]
        lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
                 " & ".join(head) + r" \\", r"\midrule"]
        for i, row in enumerate(rows):
            c = cells(i, row, digits)
            c[0] = _latex_escape(c[0])
            for j in range(len(radii)):
                if i in best[j]:
                    c[5 + j] = r"\textbf{" + c[5 + j] + "}"
            lines.append(" & ".join(c) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"
    raise ValueError(f"unknown table format {fmt!r}")


# -- plot ------------------------------------------------------------------------------------------

def _norm_of(results: Results) -> Optional[str]:
    norm = results.metadata.get("norm")
    if norm is None and results.rows:
        norm = results.rows[0].extra.get("norm")
    return norm if isinstance(norm, str) else None


def plot_curves(path: str, summaries: Sequence[FileSummary], rho: float, method: str, *,
                high_prob: bool = False, with_envelope: bool = False, max_radius: Optional[float] = None,
                title: Optional[str] = None) -> None:
    """Certified accuracy against radius, one curve per file, on one figure saved to ``path`` (the
    format follows the extension: png, pdf, svg). Uses matplotlib's Agg canvas, never pyplot."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise AnalyzeError("--plot needs matplotlib: pip install 'fastsmooth[plot]'") from None
    all_results = [s.results for s in summaries]
    if max_radius is None:
        top = max((row.radius for r in all_results if r.has_radius for row in r.rows if row.correct), default=0.0)
        max_radius = top * 1.05 if top > 0 else 1.0
    grid = np.linspace(0.0, max_radius, 1001)
    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    curves = []
    for k, s in enumerate(summaries):
        color = f"C{k % 10}"
        if s.results.has_radius:
            curve = certified_accuracy(s.results, grid)
            curves.append(curve)
            ax.plot(grid, curve, color=color, label=s.label)
            if high_prob:
                ax.plot(grid, high_prob_accuracy(s.results, grid, s.alpha, rho, method), color=color,
                        linestyle="--", linewidth=1.0, label=f"{s.label} (high-prob)")
        else:  # a PREDICT file: accuracy at r = 0 only
            ax.plot([0.0], [s.accuracy[0] if len(s.accuracy) else np.nan], marker="o", color=color,
                    linestyle="none", label=f"{s.label} (predict, r = 0)")
    if with_envelope and curves:
        ax.plot(grid, envelope(curves), color="black", linestyle=":", linewidth=2.0, label="envelope")
    norms = {_norm_of(r) for r in all_results}
    norm = norms.pop() if len(norms) == 1 else None
    ax.set_xlabel(f"{norm} radius" if norm else "radius")
    ax.set_ylabel("certified accuracy")
    ax.set_xlim(0.0, max_radius)
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


# -- command line ----------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE.tsv",
                        help="result files of fastsmooth or of Cohen et al.'s certify.py / predict.py")
    parser.add_argument("--radii", nargs="+", type=float, default=None, metavar="R",
                        help="radii of the table (default: 0, 0.25, ... up to the largest certified radius)")
    parser.add_argument("--table", choices=["md", "latex", "csv", "none"], default="md",
                        help="table format on standard output or --output (default md)")
    parser.add_argument("-o", "--output", default=None, help="write the table to this file instead")
    parser.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                        help="one label per file (default: the file names)")
    parser.add_argument("--plot", default=None, metavar="CURVES.png",
                        help="plot certified accuracy against radius, all files on one figure")
    parser.add_argument("--envelope", action="store_true",
                        help="add the outer envelope across files (table row and plot curve)")
    parser.add_argument("--high-prob", action="store_true",
                        help="add the high-probability lower bound on certified accuracy (Cohen et al.)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="failure probability of each certificate (default: the file's metadata, else 0.001)")
    parser.add_argument("--rho", type=float, default=0.001,
                        help="failure probability of the high-probability bound (default 0.001)")
    parser.add_argument("--high-prob-method", choices=["binomial", "cohen"], default="binomial",
                        help="exact binomial bound (default) or the expression of Cohen et al.'s analyze.py")
    parser.add_argument("--max-radius", type=float, default=None,
                        help="largest radius of the plot and of the default radii")
    parser.add_argument("--digits", type=int, default=3, help="decimals in md/latex tables (default 3)")
    parser.add_argument("--title", default=None, help="plot title")
    parser.set_defaults(run=run)


def _check_args(args) -> None:
    if args.radii is not None and any(not math.isfinite(r) or r < 0 for r in args.radii):
        raise AnalyzeError("--radii must be finite and >= 0")
    if args.alpha is not None and not 0.0 < args.alpha < 1.0:
        raise AnalyzeError(f"--alpha must lie in (0, 1), got {args.alpha}")
    if not 0.0 < args.rho < 1.0:
        raise AnalyzeError(f"--rho must lie in (0, 1), got {args.rho}")
    if args.max_radius is not None and not (math.isfinite(args.max_radius) and args.max_radius > 0):
        raise AnalyzeError("--max-radius must be > 0")
    if args.labels is not None and len(args.labels) != len(args.files):
        raise AnalyzeError(f"--labels gives {len(args.labels)} labels for {len(args.files)} files")
    if args.digits < 0:
        raise AnalyzeError("--digits must be >= 0")


def _read(path: str) -> Results:
    try:
        results = read_results(path)
    except FileNotFoundError:
        raise AnalyzeError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise AnalyzeError(f"{path}: is a directory, not a result file") from None
    except OSError as exc:
        raise AnalyzeError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ResultsFormatError as exc:
        raise AnalyzeError(str(exc)) from None
    if not results.rows:
        raise AnalyzeError(f"{path}: no result rows")
    return results


def _labels(files: Sequence[str]) -> List[str]:
    names = [os.path.basename(f) for f in files]
    return names if len(set(names)) == len(names) else list(files)


def _file_alpha(args, results: Results) -> float:
    if args.alpha is not None:
        return args.alpha
    value = results.metadata.get("alpha")
    try:
        value = float(value)
    except (TypeError, ValueError):
        return DEFAULT_ALPHA
    return value if 0.0 < value < 1.0 else DEFAULT_ALPHA


def run(args) -> int:
    try:
        _check_args(args)
        all_results = [_read(path) for path in args.files]
        labels = args.labels or _labels(args.files)
        radii = args.radii if args.radii is not None else auto_radii(all_results, args.max_radius)
        summaries = [summarize(r, label, radii, _file_alpha(args, r), args.rho, args.high_prob_method)
                     for r, label in zip(all_results, labels)]
        for r, label in zip(all_results, labels):
            targets = target_radii(r)
            if targets is not None:
                print(f"fastsmooth analyze: {label} was certified at target radii {' '.join(f'{t:g}' for t in targets)} "
                      "(its radius column is the largest target certified): between targets its certified "
                      "accuracy and ACR are lower bounds", file=sys.stderr)
        if args.table != "none":
            text = render_table(summaries, radii, args.table, args.digits, args.high_prob, args.envelope,
                                all_results)
            if args.output:
                try:
                    with open(args.output, "w", encoding="utf-8") as f:
                        f.write(text)
                except OSError as exc:
                    raise AnalyzeError(f"cannot write {args.output}: {exc.strerror or exc}") from None
            else:
                sys.stdout.write(text)
                sys.stdout.flush()
        if args.plot:
            try:
                plot_curves(args.plot, summaries, args.rho, args.high_prob_method, high_prob=args.high_prob,
                            with_envelope=args.envelope, max_radius=args.max_radius, title=args.title)
            except OSError as exc:
                raise AnalyzeError(f"cannot write {args.plot}: {exc.strerror or exc}") from None
            except ValueError as exc:  # e.g. an extension matplotlib has no writer for
                raise AnalyzeError(f"cannot write {args.plot}: {str(exc).splitlines()[0]}") from None
    except AnalyzeError as exc:
        print(f"fastsmooth analyze: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastsmooth analyze", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
