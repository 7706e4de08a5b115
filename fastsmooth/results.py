"""Result rows: Cohen-compatible TSV files, written whole and flushed per image, resumable.

The TSV stays exactly Cohen's format (a header line, then one row per image; the first columns are
``idx label predict radius correct time``, fastsmooth's extra columns after them), so pandas and
the original analysis scripts read it unchanged. What defines the run (noise, precision, backend,
seed, checkpoint, ...) goes to a side file ``OUT.meta.json``.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from typing import Iterable, Optional

CERTIFY_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time", "p_lower", "n_a", "n", "norm")
PREDICT_COLUMNS = ("idx", "label", "predict", "correct", "time")


# -- writing ---------------------------------------------------------------------------------------

class ResultWriter:
    """Writes rows to ``path`` (standard output when None), one whole, flushed line per image.

    A crash loses at most the image in progress; ``resume=True`` keeps the complete rows already
    there (a torn last line is cut off) and ``done`` lists their indices, so the run continues
    after them and the final file equals an uninterrupted run (all columns but time).
    """

    def __init__(self, path: Optional[str], columns: Iterable[str], *, metadata: Optional[dict] = None,
                 resume: bool = False, force: bool = False):
        self.path, self.columns = path, tuple(columns)
        self.done: set[int] = set()
        if path is None:
            self._file = sys.stdout
            self._write_line("\t".join(self.columns))
            return
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"the output directory {directory} does not exist")
        meta_path = path + ".meta.json"
        if os.path.exists(path) and resume:
            self._check_metadata(meta_path, metadata)
            self.done = self._recover(path)
            self._file = open(path, "a", encoding="utf-8")
        else:
            if os.path.exists(path) and not force:
                raise FileExistsError(f"{path} exists; pass --resume to continue it or --force to overwrite it")
            self._file = open(path, "w", encoding="utf-8")
            self._write_line("\t".join(self.columns))
        if metadata is not None:
            _atomic_write_json(meta_path, metadata)

    def _check_metadata(self, meta_path: str, metadata: Optional[dict]) -> None:
        if metadata is None or not os.path.exists(meta_path):
            return
        with open(meta_path, encoding="utf-8") as f:
            old = json.load(f)
        keys = [k for k in metadata if k not in ("started", "finished") and k in old and old[k] != metadata[k]]
        if keys:
            raise ValueError(f"cannot resume {self.path}: it was written with different settings "
                             f"({', '.join(f'{k}={old[k]!r}' for k in keys)})")

    def _recover(self, path: str) -> set:
        """Indices of the complete rows of ``path``; a torn last line (no newline) is truncated."""
        with open(path, "rb+") as f:
            data = f.read()
            end = data.rfind(b"\n") + 1
            if end != len(data):
                f.truncate(end)
        lines = data[:end].decode("utf-8").splitlines()
        if not lines or lines[0].split("\t")[: len(self.columns)] != list(self.columns):
            raise ValueError(f"cannot resume {path}: its header is not {' '.join(self.columns)}")
        return {int(line.split("\t", 1)[0]) for line in lines[1:] if line.strip()}

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


def format_time(seconds: float, cohen: bool = False) -> str:
    """Seconds as Cohen's timedelta string ("0:00:01.234567") or as plain seconds."""
    return str(datetime.timedelta(seconds=seconds)) if cohen else f"{seconds:.4f}"


def format_radius(radius: float, cohen: bool = False) -> str:
    """Cohen's scripts print the radius with "{:.3}"; fastsmooth keeps six significant digits."""
    return f"{radius:.3}" if cohen else f"{radius:.6g}"


def _atomic_write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)
