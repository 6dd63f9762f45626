"""Where training records come from: JSON files (plain or gzip), parquet, a ``datasets`` folder.

=========================================  ==============================================
source                                     read
=========================================  ==============================================
``.jsonl`` / ``.ndjson``                   line by line (streamed)
``.json``                                  JSONL line by line, or a JSON array parsed whole
``.jsonl.gz`` / ``.json.gz``               the same through gzip (streamed)
``.parquet``                               by record batches (pyarrow)
a ``datasets`` ``save_to_disk`` folder     its Arrow stream files batch by batch (pyarrow)
=========================================  ==============================================

:func:`iter_records` yields ``(number, record)``: the 1-based line of JSON sources, the
1-based row of tables. Memory is bounded by one line or one batch, never the file, except
for a JSON array, which is parsed whole. ``field_map`` renames fields of each record before
anything else looks at it. pyarrow is an optional extra (``sftplug[parquet]``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import zlib
from pathlib import Path

from sftplug.data.records import BadLog
from sftplug.errors import SftplugError

JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
GZIP_SUFFIXES = tuple(s + ".gz" for s in JSON_SUFFIXES)
SUPPORTED = (".jsonl, .json (JSONL or a JSON array), .jsonl.gz, .json.gz, .parquet, "
             "or a folder written by datasets' save_to_disk")
BATCH_ROWS = 1024  # table rows turned into dicts at a time
CHUNK = 1 << 20  # bytes hashed at a time
_READ_ERRORS = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError


# -- what a path is ------------------------------------------------------------------
def _kind(path: Path) -> str:
    """"json", "gzip", "parquet" or "folder"; a one-line error for anything else."""
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = _read_json(path / "dataset_dict.json").get("splits") or ["train"]
            raise SftplugError(f"{path}: a datasets DatasetDict folder (splits: {', '.join(splits)}); "
                               f"pass one split's folder, e.g. {path / splits[0]}")
        if not (path / "state.json").is_file():
            raise SftplugError(f"{path}: is a folder without a datasets state.json; pass {SUPPORTED}")
        return "folder"
    name = path.name.lower()
    kind = next((k for k, suffixes in (("gzip", GZIP_SUFFIXES), ("json", JSON_SUFFIXES), ("parquet", (".parquet",)))
                 if name.endswith(suffixes)), None)
    if not path.exists():
        raise SftplugError(f"{path}: data file not found")
    if kind is None:
        raise SftplugError(f"{path}: unsupported data file; sftplug reads {SUPPORTED}")
    return kind


def check_path(path) -> None:
    """The one-line error of a path that is no data sftplug reads (missing, unsupported), without reading it."""
    _kind(Path(path))


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SftplugError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if not isinstance(value, dict):
        raise SftplugError(f"{path}: expected a JSON object")
    return value


def _data_files(folder: Path) -> list[Path]:
    """The Arrow stream files of a save_to_disk folder, in the order state.json lists them."""
    names = [f.get("filename") for f in _read_json(folder / "state.json").get("_data_files") or []]
    if not names or not all(isinstance(n, str) for n in names):
        raise SftplugError(f"{folder / 'state.json'}: no '_data_files' list; is this a datasets save_to_disk folder?")
    return [folder / n for n in names]


def _pyarrow(path: Path):
    try:
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise SftplugError(f"{path}: reading parquet and datasets folders needs pyarrow: "
                           "pip install 'sftplug[parquet]'") from None
    return pyarrow


def _cannot_read(path, exc: Exception) -> SftplugError:
    why = getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    return SftplugError(f"{path}: cannot be read ({why})")


# -- records -------------------------------------------------------------------------
def iter_records(path, bad: BadLog, field_map: dict[str, str] | None = None):
    """``(number, record)`` of every record of a source (see the module docstring).

    Bad lines (invalid JSON, bad UTF-8) and records missing a ``field_map`` field go to
    ``bad``; a source that cannot be read at all is a one-line SftplugError.
    """
    path = Path(path)
    kind = _kind(path)
    if kind in ("json", "gzip"):
        records = _json_records(path, gzip.open if kind == "gzip" else open)
    else:
        records = _table_records(path, kind)
    if field_map:
        records = _renamed(records, field_map)
    yield from _reported(path, records, bad)


def _reported(path, records, bad: BadLog):
    """Bad lines of JSON sources arrive as _BadLine and go to ``bad``; read errors become one line."""
    try:
        for number, record in records:
            if isinstance(record, _BadLine):
                bad(path, number, record.problem)
            else:
                yield number, record
    except _READ_ERRORS as exc:
        raise _cannot_read(path, exc) from None


class _BadLine:
    """What a reader yields instead of a record it could not read, for :func:`_reported` to log."""

    def __init__(self, problem: str):
        self.problem = problem


def _renamed(records, field_map: dict[str, str]):
    """Records with their fields renamed; one that cannot be renamed becomes a bad line."""
    for number, record in records:
        if isinstance(record, dict):
            problem = _rename_problem(record, field_map)
            if problem:
                record = _BadLine(problem)
            else:
                record = {field_map.get(k, k): v for k, v in record.items()}
        yield number, record


def _rename_problem(record: dict, field_map: dict[str, str]) -> str | None:
    for source, target in field_map.items():
        if source not in record:
            return f"no field '{source}' to rename (--field-map {source}={target})"
        if target in record and target not in field_map:
            return f"already has a field '{target}' (--field-map {source}={target} would overwrite it)"
    return None


def _json_records(path: Path, opener):
    """JSONL line by line; a file whose first non-blank character is '[' is a JSON array, parsed whole."""
    with opener(path, "rb") as f:
        blank = []  # the lines before the first record, kept for a JSON array's line numbers
        for lineno, line in enumerate(f, start=1):
            if blank is not None:
                if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
                if not line.strip():
                    blank.append(line)
                    continue
                if line.lstrip()[:1] == b"[":
                    yield from _json_array(path, b"".join(blank) + line + f.read())
                    return
                blank = None  # JSONL
            yield from _json_line(lineno, line)


def _json_line(lineno: int, line: bytes):
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        yield lineno, _BadLine(_utf8_problem(line, exc)[1])
        return
    if not text.strip():
        return
    try:
        yield lineno, json.loads(text)
    except json.JSONDecodeError as exc:
        yield lineno, _BadLine(f"invalid JSON ({exc.msg} at column {exc.colno})")


def _utf8_problem(raw: bytes, exc: UnicodeDecodeError) -> tuple[int, str]:
    line = raw.count(b"\n", 0, exc.start) + 1
    column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
    return line, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {column}); re-encode the file as UTF-8"


_WS = re.compile(r"[ \t\n\r]*")


def _json_array(path, raw: bytes):
    """(line, record) of a JSON array, each record numbered by the line it starts on."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, problem = _utf8_problem(raw, exc)
        raise SftplugError(f"{path}:{line}: {problem}") from None
    decoder = json.JSONDecoder()
    pos = _WS.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    if text.startswith("]", pos):
        return
    while True:
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise SftplugError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        line += text.count("\n", counted, pos)
        counted = pos
        yield line, record
        pos = _WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            if text[pos + 1 :].strip():
                where = line + text.count("\n", counted, pos)
                raise SftplugError(f"{path}:{where}: invalid JSON (extra data after the closing ']')")
            return
        else:
            where = line + text.count("\n", counted, pos)
            raise SftplugError(f"{path}:{where}: invalid JSON (expected ',' or ']' between records)")


def _table_records(path: Path, kind: str):
    """(row, dict) of a parquet file or a save_to_disk folder, BATCH_ROWS rows at a time."""
    pa = _pyarrow(path)
    row = 0
    for batch in _batches(pa, path, kind):
        for start in range(0, batch.num_rows, BATCH_ROWS):
            for record in batch.slice(start, BATCH_ROWS).to_pylist():
                row += 1
                yield row, record


def _batches(pa, path: Path, kind: str):
    try:
        if kind == "parquet":
            yield from pa.parquet.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)
            return
        for file in _data_files(path):
            with pa.memory_map(str(file)) as source:  # mapped: a batch is read when used
                yield from pa.ipc.open_stream(source)
    except pa.ArrowException as exc:
        raise _cannot_read(path, exc) from None


# -- whole sources -------------------------------------------------------------------
def fingerprint(path) -> str:
    """sha256 hex of a source's content, read in chunks (a folder: state.json then its data files)."""
    path = Path(path)
    files = [path / "state.json", *_data_files(path)] if _kind(path) == "folder" else [path]
    digest = hashlib.sha256()
    for file in files:
        if len(files) > 1:
            digest.update(f"{file.name}\0".encode())
        try:
            with open(file, "rb") as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
        except OSError as exc:
            raise _cannot_read(file, exc) from None
    return digest.hexdigest()


def first_record(path, field_map: dict[str, str] | None = None) -> dict:
    """The first record of a source, without reading the rest (a JSON array is parsed whole)."""
    found = next(iter_records(path, BadLog(skip=False), field_map), None)
    if found is None:
        raise SftplugError(f"{path}: no records (the file is empty)")
    return found[1]
