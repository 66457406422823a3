"""Readers for TSV, CSV and JSONL files whose every error names the file and the line.

Written here rather than with `datasets`/pandas because their errors on bad rows say neither
the file nor the line, and a study should stop with a message the user can act on.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from peftlab.errors import DataError

Row = dict[str, str]


_tracking: list[set[Path]] = []  # stacks of files read, for `track_reads`


@contextmanager
def track_reads() -> Iterator[set[Path]]:
    """Collect the paths every reader opens inside the block (for cache validation)."""
    seen: set[Path] = set()
    _tracking.append(seen)
    try:
        yield seen
    finally:
        _tracking.remove(seen)


def file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _read_lines(path: Path) -> list[str]:
    for seen in _tracking:
        seen.add(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Excel writes one)
        data = data[3:]
    if not data.strip():
        raise DataError(f"{path}: the file is empty")
    lines = data.split(b"\n")
    out = []
    for i, raw in enumerate(lines, start=1):
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}:{i}: undecodable bytes (not UTF-8: {e.reason} at column {e.start + 1})"
            ) from None
    return out


def _check_columns(path: Path, header: list[str], required: list[str], line: int = 1) -> None:
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(
            f"{path}:{line}: missing column(s) {', '.join(map(repr, missing))}; "
            f"the file has {', '.join(map(repr, header))}"
        )


def read_tsv(path: str | Path, required: list[str]) -> list[tuple[int, Row]]:
    """GLUE-style TSV: a header line, then one row per line, fields split on tabs, no quoting."""
    path = Path(path)
    lines = _read_lines(path)
    header = lines[0].rstrip("\r").split("\t")
    _check_columns(path, header, required)
    rows = []
    for i, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(
                f"{path}:{i}: expected {len(header)} tab-separated fields, found {len(fields)}"
            )
        rows.append((i, dict(zip(header, fields, strict=True))))
    if not rows:
        raise DataError(f"{path}: no data rows after the header")
    return rows


def read_csv(path: str | Path, required: list[str]) -> list[tuple[int, Row]]:
    path = Path(path)
    text = "\n".join(_read_lines(path))
    reader = csv.DictReader(io.StringIO(text))
    try:
        header = list(reader.fieldnames or [])
    except csv.Error as e:
        raise DataError(f"{path}:1: malformed CSV header: {e}") from None
    _check_columns(path, header, required)
    rows = []
    try:
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise DataError(f"{path}:{reader.line_num}: wrong number of fields")
            rows.append((reader.line_num, row))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None
    if not rows:
        raise DataError(f"{path}: no data rows after the header")
    return rows


def read_jsonl(path: str | Path, required: list[str]) -> list[tuple[int, Row]]:
    path = Path(path)
    rows = []
    for i, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
        missing = [c for c in required if c not in obj]
        if missing:
            raise DataError(f"{path}:{i}: missing key(s) {', '.join(map(repr, missing))}")
        for c in required:
            if not isinstance(obj[c], str | int):
                raise DataError(f"{path}:{i}: `{c}` must be a string, got {type(obj[c]).__name__}")
        rows.append((i, {k: str(v) for k, v in obj.items() if k in required or k == "id"}))
    if not rows:
        raise DataError(f"{path}: no data rows")
    return rows


def read_table(path: str | Path, required: list[str]) -> list[tuple[int, Row]]:
    """Pick the reader by file extension: .tsv, .csv, .jsonl/.json."""
    suffix = Path(path).suffix.lower()
    readers = {".tsv": read_tsv, ".csv": read_csv, ".jsonl": read_jsonl, ".json": read_jsonl}
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type `{suffix}` (use .tsv, .csv or .jsonl)")
    return readers[suffix](path, required)
