"""Result rows: Cohen-compatible TSV files, written whole and flushed per image, resumable.

The TSV stays exactly Cohen's format (a header line, then one row per image; the first columns are
``idx label predict radius correct time``, fastsmooth's extra columns after them), so pandas and
the original analysis scripts read it unchanged. What defines the run (noise, precision, backend,
seed, checkpoint, ...) goes to a side file ``OUT.meta.json``.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
import glob
from typing import Dict, Iterable, List, Optional

CERTIFY_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time", "p_lower", "n_a", "n", "norm")
PREDICT_COLUMNS = ("idx", "label", "predict", "correct", "time")


# -- writing ---------------------------------------------------------------------------------------

class ResultWriter:
    """Writes rows to ``path`` (standard output when None), one whole, flushed line per image.

    A crash loses only the images in progress (on a GPU also those queued behind them, see
    ``Smooth.overlap``). ``resume=True`` appends to ``path`` as ``consolidate`` left it (the complete
    rows of the interrupted run, a torn last line cut off), so that the final file equals an
    uninterrupted run (all columns but time).
    """

    def __init__(self, path: Optional[str], columns: Iterable[str], *, metadata: Optional[dict] = None,
                 resume: bool = False, force: bool = False):
        self.path, self.columns = path, tuple(columns)
        if path is None:
            self._file = sys.stdout
            self._write_line("\t".join(self.columns))
            return
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"the output directory {directory} does not exist")
        if os.path.exists(path) and resume:  # the caller has consolidated it (parts folded in)
            self._file = open(path, "a", encoding="utf-8")
        else:
            if os.path.exists(path) and not force:
                raise FileExistsError(f"{path} exists; pass --resume to continue it or --force to overwrite it")
            self._file = open(path, "w", encoding="utf-8")
            self._write_line("\t".join(self.columns))
        if metadata is not None:
            write_metadata(path, metadata)

    def _write_line(self, line: str) -> None:
        self._file.write(line + "\n")
        self._file.flush()

    def write(self, row: dict) -> None:
        self._write_line("\t".join(str(row[c]) for c in self.columns))
        if self._file is not sys.stdout:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not sys.stdout:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- result files: parts, resume, metadata -----------------------------------------------------

META_SUFFIX = ".meta.json"
_PART = re.compile(r"\.rank(\d+)\.part$")
# Information beside the settings: when a run started, what compiling cost and why each "auto"
# choice came out as it did (the choices themselves are settings and are checked).
UNCHECKED_META = ("started", "finished", "compile_seconds", "tuning")
# Certify settings recorded since the sequential modes, with the value older files imply.
_IMPLIED_META = {"mode": "fixed"}


def part_path(out: str, rank: int) -> str:
    return f"{out}.rank{rank}.part"


def find_parts(out: str) -> List[str]:
    """The part files of OUT (any rank), by rank."""
    found = [p for p in glob.glob(glob.escape(out) + ".rank*.part") if _PART.search(p)]
    return sorted(found, key=lambda p: int(_PART.search(p).group(1)))


def existing_outputs(out: str) -> List[str]:
    """OUT and its part files, those that exist."""
    return ([out] if os.path.exists(out) else []) + find_parts(out)


def read_rows(path: str, columns: Iterable[str]) -> Dict[int, str]:
    """{image index: row line} of the complete rows of a result or part file.

    A torn last line (no newline) is ignored; an empty file (killed before its header) has no rows.
    Raises ValueError for a file whose header is not ``columns`` or with a malformed complete row.
    """
    columns = list(columns)
    with open(path, "rb") as f:
        data = f.read()
    data = data[: data.rfind(b"\n") + 1]
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"cannot resume {path}: not a text file") from None
    if not lines:
        return {}
    if lines[0].split("\t") != columns:
        raise ValueError(f"cannot resume {path}: its header is not {' '.join(columns)}")
    rows: Dict[int, str] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            if len(fields) != len(columns):
                raise ValueError
            index = int(fields[0])
        except ValueError:
            raise ValueError(f"cannot resume {path}: line {number} is not a result row") from None
        rows.setdefault(index, line)
    return rows


def _write_atomically(path: str, text: str) -> None:
    """A reader sees the old file or the whole new one, never a part (temporary file + rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_rows(path: str, columns: Iterable[str], rows: Dict[int, str]) -> None:
    """Write ``rows`` (index -> line) to ``path`` in index order, atomically."""
    _write_atomically(path, "".join(line + "\n" for line in ["\t".join(columns)] + [rows[i] for i in sorted(rows)]))


def write_metadata(out: str, metadata: dict) -> None:
    _write_atomically(out + META_SUFFIX, json.dumps(metadata, indent=2, sort_keys=True, default=str))


def check_metadata(out: str, metadata: dict) -> None:
    """Refuse to resume OUT when its side file records different settings."""
    path = out + META_SUFFIX
    if not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot resume {out}: unreadable {path} ({exc})") from None
    if not isinstance(old, dict):
        raise ValueError(f"cannot resume {out}: {path} is not a JSON object")
    if old.get("command") == "certify":  # written before the sequential modes: fixed n
        old = {**_IMPLIED_META, **old}
    keys = [k for k in metadata if k not in UNCHECKED_META and k in old and old[k] != metadata[k]]
    if keys:
        raise ValueError(f"cannot resume {out}: it was written with different settings "
                         f"({', '.join(f'{k}={old[k]!r}' for k in keys)})")


def consolidate(out: str, columns, metadata: Optional[dict]) -> set:
    """Fold the complete rows of OUT and of its part files into OUT (index order); delete the parts.

    Returns the indices done. Nothing is written when neither OUT nor a part exists.
    """
    present = existing_outputs(out)
    if not present:
        return set()
    if metadata is not None:
        check_metadata(out, metadata)
    rows: Dict[int, str] = {}
    for path in present:
        for index, line in read_rows(path, columns).items():
            rows.setdefault(index, line)
    write_rows(out, columns, rows)
    for path in present[1:] if present[0] == out else present:
        os.remove(path)
    return set(rows)


def sort_rows(out: str, columns) -> None:
    """Rewrite OUT in index order if it is not (rows appended by a resumed run)."""
    rows = read_rows(out, columns)
    if list(rows) != sorted(rows):
        write_rows(out, columns, rows)


def format_time(seconds: float, cohen: bool = False) -> str:
    """Seconds as Cohen's timedelta string ("0:00:01.234567") or as plain seconds."""
    return str(datetime.timedelta(seconds=seconds)) if cohen else f"{seconds:.4f}"


def format_radius(radius: float, cohen: bool = False) -> str:
    """The radius rounded down, so the printed radius never exceeds the certified one: to three
    significant digits in Cohen's "{:.3}" form, else to six decimals."""
    if math.isinf(radius):
        return "inf"
    if cohen:
        if radius <= 0:
            return f"{0.0:.3}"
        step = 10.0 ** (math.floor(math.log10(radius)) - 2)
        return f"{math.floor(radius / step) * step:.3}"
    return f"{math.floor(radius * 1e6) / 1e6:.6f}"


def format_probability(p: float) -> str:
    """A lower bound printed with six decimals, rounded down."""
    return f"{math.floor(p * 1e6) / 1e6:.6f}"


# == reading (for `fastsmooth analyze`) ============================================================
# Self-contained: reads the TSV files of Cohen et al.'s certify.py / predict.py (and Salman et al.'s,
# which write the same columns) and fastsmooth's. Tolerated: the time column as float seconds or as
# str(datetime.timedelta) ("0:00:01.234567", "1 day, 0:00:01"); the radius as "%.4f", "{:.3}" or
# "%.6g"; extra columns after the first ones; blank lines; "#" comment / metadata lines (anywhere);
# a repeated header line (files appended to by a second run); and a torn last line (a file being
# written: the last line has no newline and does not parse). PREDICT files have no radius column.

REQUIRED_COLUMNS = ("idx", "label", "predict", "correct")
_TIMEDELTA = re.compile(r"^(?:(-?\d+) days?, )?(\d+):(\d{1,2}):(\d{1,2}(?:\.\d*)?)$")
_TRUE, _FALSE = ("1", "true", "True", "TRUE"), ("0", "false", "False", "FALSE")


class ResultsFormatError(ValueError):
    """A result file that cannot be read as rows of Cohen's / fastsmooth's TSV format."""


@dataclass
class ResultRow:
    """One image of a result file. predict == -1 is ABSTAIN."""

    idx: int
    label: int
    predict: int
    correct: bool
    radius: Optional[float] = None  # None in PREDICT files (no radius column)
    time: Optional[float] = None    # seconds; None without a time column
    extra: dict = field(default_factory=dict)  # any further columns, as strings

    @property
    def abstained(self) -> bool:
        return self.predict == -1


@dataclass
class Results:
    """The rows of one result file, its header and its metadata.

    metadata: ``#`` lines of the TSV ("# key: value", "# key = value" or "# {json}") and, when it
    exists, the side file ``PATH.meta.json`` that fastsmooth writes (the side file wins).
    """

    path: str
    columns: list
    rows: list
    metadata: dict = field(default_factory=dict)

    @property
    def has_radius(self) -> bool:
        return "radius" in self.columns

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)


def parse_time(text: str) -> float:
    """Seconds from float seconds ("1.2345") or Cohen's str(timedelta) ("0:00:01.234567")."""
    text = text.strip()
    m = _TIMEDELTA.match(text)
    if m:
        days, hours, minutes, seconds = m.groups()
        return int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    value = float(text)  # ValueError for anything else
    if not math.isfinite(value):
        raise ValueError(f"not a finite time: {text!r}")
    return value


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        value = float(text)  # "3.0" from a float-typed pandas column written back
        if not value.is_integer():
            raise ValueError(f"not an integer: {text!r}") from None
        return int(value)


def _parse_bool(text: str) -> bool:
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"not 0/1/True/False: {text!r}")


def _parse_radius(text: str) -> float:
    value = float(text)
    if math.isnan(value) or value < 0:
        raise ValueError(f"not a radius >= 0: {text!r}")
    return value


def _comment_metadata(line: str, metadata: dict) -> None:
    body = line.lstrip("#").strip()
    if not body:
        return
    if body.startswith("{"):
        try:
            data = json.loads(body)
        except ValueError:
            return
        if isinstance(data, dict):
            metadata.update(data)
        return
    m = re.match(r"^([A-Za-z_][\w.\-]*)\s*[:=]\s*(.*)$", body)
    if m:
        key, value = m.group(1), m.group(2).strip()
        try:
            metadata[key] = json.loads(value)
        except ValueError:
            metadata[key] = value


def read_results(path: str) -> Results:
    """Read one result TSV. Raises OSError for a missing/unreadable file and ResultsFormatError
    (a ValueError, whose message names the file and line) for a malformed one."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ResultsFormatError(f"{path}: not a text (UTF-8) file ({exc.reason} at byte {exc.start})") from None
    torn = bool(text) and not text.endswith("\n")
    lines = text.splitlines()
    metadata: dict = {}
    columns: Optional[list] = None
    rows: list = []
    for number, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        if line.lstrip().startswith("#"):
            _comment_metadata(line, metadata)
            continue
        fields = line.split("\t")
        if columns is None:
            columns = [c.strip() for c in fields]
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise ResultsFormatError(
                    f"{path}: line {number}: the header lacks the column(s) {', '.join(missing)} "
                    f"(expected tab-separated 'idx label predict radius correct time'; got {line[:80]!r})")
            continue
        if [f.strip() for f in fields] == columns:
            continue  # the header again (a second run appended to the file)
        try:
            rows.append(_parse_row(columns, fields))
        except ValueError as exc:
            if torn and number == len(lines):
                break  # the last line of a file still being written
            raise ResultsFormatError(f"{path}: line {number}: {exc}") from None
    if columns is None:
        raise ResultsFormatError(f"{path}: no header line (expected 'idx label predict radius correct time')")
    side = path + META_SUFFIX
    if os.path.isfile(side):
        try:
            with open(side, encoding="utf-8") as f:
                extra = json.load(f)
            if isinstance(extra, dict):
                metadata.update(extra)
        except (OSError, ValueError):
            pass  # the metadata is a convenience; the rows are what is analysed
    return Results(path=path, columns=columns, rows=rows, metadata=metadata)


def _parse_row(columns: list, fields: list) -> ResultRow:
    if len(fields) != len(columns):
        raise ValueError(f"{len(fields)} fields for {len(columns)} columns")
    values = dict(zip(columns, (f.strip() for f in fields)))
    row = ResultRow(idx=_parse_int(values.pop("idx")), label=_parse_int(values.pop("label")),
                    predict=_parse_int(values.pop("predict")), correct=_parse_bool(values.pop("correct")))
    if "radius" in values:
        row.radius = _parse_radius(values.pop("radius"))
    if "time" in values:
        row.time = parse_time(values.pop("time"))
    row.extra = values
    return row
