"""File kinds: where a task's records come from, one dict at a time, each with where it was.

  jsonl    one JSON object per line                       where: `file:LINE`
  json     one JSON array of objects                      where: `file: row N (line L)`
  csv      a header row, then one record per row          where: `file: row N (line L)`
  parquet  one record per row (read in batches)           where: `file: row N`
  dataset  a folder saved with `datasets`' save_to_disk   where: `folder: row N`
           (a DatasetDict: its `train` split, or its only one)

The kind comes from the extension (.jsonl/.json/.csv/.tsv/.parquet/.pq, a folder is a dataset), else
from the content (Parquet's magic bytes, a leading `[` or `{`). A record that cannot be read is handed
on as an error (the caller's `on_bad_line` decides); a file that cannot be read at all raises.
Columnar rows (CSV, Parquet, datasets) carry every column: a null cell counts as an absent key, and a
CSV cell holding `messages`, `conversations` or `tools` is JSON text.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

from muxtune.errors import MuxTuneError

SOURCES = ("jsonl", "json", "csv", "parquet", "dataset")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv",
              ".parquet": "parquet", ".pq": "parquet"}
JSON_CELLS = ("messages", "conversations", "tools")  # structured columns a CSV holds as JSON text
BATCH_ROWS = 1024

Record = tuple[str, "dict | MuxTuneError"]


def source_kind(path: Path) -> str:
    path = Path(path)
    if path.is_dir():
        return "dataset"
    kind = EXTENSIONS.get(path.suffix.lower())
    with path.open("rb") as handle:
        head = handle.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    if kind == "json":  # many `.json` training files are really JSON Lines
        return "json" if head.lstrip().startswith(b"[") else "jsonl"
    if kind:
        return kind
    return "json" if head.lstrip().startswith(b"[") else "jsonl"


def read_records(path: Path, kind: str) -> Iterator[Record]:
    readers = {"jsonl": _jsonl, "json": _json_array, "csv": _csv, "parquet": _parquet, "dataset": _dataset}
    return readers[kind](Path(path))


def _jsonl(path: Path) -> Iterator[Record]:
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            if raw.strip():
                where = f"{path}:{lineno}"
                try:
                    yield where, _object(_decode_json(raw, where), where)
                except MuxTuneError as exc:
                    yield where, exc


def _decode_json(raw: bytes, where: str):
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MuxTuneError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise MuxTuneError(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})") from None


def _object(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise MuxTuneError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _json_array(path: Path) -> Iterator[Record]:
    """Element by element (raw_decode), so each record knows its line; the text is read whole, so a
    file too large for memory belongs in JSONL."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MuxTuneError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    decoder, pos, row = json.JSONDecoder(), _skip_space(text, 0), 0
    if not text.startswith("[", pos):
        raise MuxTuneError(f"{path}: expected a JSON array of records")
    pos = _skip_space(text, pos + 1)
    while not text.startswith("]", pos):
        row += 1
        line = text.count("\n", 0, pos) + 1
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:  # the rest cannot be told apart: a whole-file error
            raise MuxTuneError(f"{path}: row {row} (line {exc.lineno}): not valid JSON: {exc.msg}") from None
        where = f"{path}: row {row} (line {line})"
        try:
            yield where, _object(record, where)
        except MuxTuneError as exc:
            yield where, exc
        pos = _skip_space(text, pos)
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif not text.startswith("]", pos):
            line = text.count("\n", 0, pos) + 1
            raise MuxTuneError(f"{path}: line {line}: expected ',' or ']' after row {row}")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _csv(path: Path) -> Iterator[Record]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            if not reader.fieldnames:
                raise MuxTuneError(f"{path}: expected a header row naming the columns (e.g. prompt,completion)")
            for row, cells in enumerate(reader, start=1):
                where = f"{path}: row {row} (line {reader.line_num})"
                if None in cells:  # DictReader puts surplus cells under None
                    yield where, MuxTuneError(f"{where}: more cells than the header's {len(reader.fieldnames)} columns")
                    continue
                try:
                    yield where, {k: _cell(k, v, where) for k, v in cells.items() if v is not None}
                except MuxTuneError as exc:
                    yield where, exc
    except UnicodeDecodeError as exc:
        raise MuxTuneError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise MuxTuneError(f"{path}: not valid CSV: {exc}") from None


def _cell(column: str, value: str, where: str):
    if column not in JSON_CELLS or value == "":
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise MuxTuneError(f"{where}: column '{column}' must hold JSON: {exc.msg}") from None


def _parquet(path: Path) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise MuxTuneError(f"{path}: not a readable Parquet file: {exc}") from None
    row = 0
    with handle:
        try:
            for batch in handle.iter_batches(batch_size=BATCH_ROWS):
                for record in batch.to_pylist():
                    row += 1
                    yield f"{path}: row {row}", _present(record)
        except pa.ArrowException as exc:
            raise MuxTuneError(f"{path}: cannot read Parquet after row {row}: {exc}") from None


def _dataset(path: Path) -> Iterator[Record]:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise MuxTuneError(f"{path}: a folder must be a dataset saved with datasets' save_to_disk: {exc}") from None
    if isinstance(dataset, DatasetDict):
        splits = list(dataset)
        if "train" not in splits and len(splits) != 1:
            raise MuxTuneError(f"{path}: a saved DatasetDict needs a 'train' split (or only one), has {splits}")
        dataset = dataset["train" if "train" in splits else splits[0]]
    row = 0
    for batch in dataset.iter(batch_size=BATCH_ROWS):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            row += 1
            yield f"{path}: row {row}", _present(dict(zip(columns, values)))


def _present(record: dict) -> dict:
    """A columnar row: a null cell is an absent key."""
    return {k: v for k, v in record.items() if v is not None}


def content_digest(path: Path, sha) -> None:
    """Feed a file's bytes (or a folder's files, by relative name) to a hash: the cache key's content."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            sha.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
