"""Task data: a user's training file in, tokenized examples (cached on disk, memory-mapped) out, a seeded
per-task order, and the padded fused micro-batch (the chunk-aligned one is in alignment.py).

File kinds (executor/sources.py): JSONL, a JSON array, CSV, Parquet, a folder saved with `datasets`'
save_to_disk; told by extension or content. Record formats (executor/formats.py), detected from a
file's first record or set with `data_format`:
  chat               OpenAI chat fine-tuning format: {"messages": [...], "tools": [...]}, with weight,
                     name, tool calls and tool outputs (and the legacy function role / function_call)
  sharegpt           {"conversations": [{"from": "human|gpt|system|tool|...", "value": ...}, ...]}
  prompt_completion  {"prompt": ..., "completion": ...}
  alpaca             {"instruction": ..., "input": ... (optional), "output": ...}
  text               {"text": ...}
With `loss_on: completion` only the completion / output / assistant tokens of weight-1 turns (and the
closing eos) carry loss; `text` always trains on every token; `loss_on: all` trains on every token of
every format.

A sequence is [bos] + tokens + [eos]. One longer than max_seq_len is either truncated (it loses the
oldest tokens before its first target token, then the end) or dropped (`truncation: drop`); both counted.

Tokenized data is written once per (file content, tokenizer, settings) to an Arrow file under the
cache folder (`MUXTUNE_CACHE`, default `.cache/muxtune/` in the working directory) with HF `datasets`'
writer, and read back memory-mapped: a large file is never held as a Python list. `inspect_file`
reports on one file (what `muxtune validate` prints, and what a service checks an upload with).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from muxtune.errors import MuxTuneError
from muxtune.executor.formats import FORMATS, detect, pieces
from muxtune.executor.mux import DATA_STREAM, Segment, stream_seed
from muxtune.executor.sources import content_digest, read_records, source_kind
from muxtune.spec import staged_directory

IGNORE = -100  # label of a token that carries no loss (HF convention)
CACHE_VERSION = 2  # bump when tokenization changes, so old cache entries are not reused
HISTOGRAM_BINS = 8  # equal bins of lengths up to max_seq_len, then one for longer sequences

__all__ = ["FORMATS", "IGNORE", "DataOptions", "DataStats", "Example", "FileReport", "inspect_file", "load_examples"]


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss; else equal to input_ids (the model shifts)
    # its position among its file's usable examples (TokenizedData sets it), so an error about it can
    # name the file's line (example_origin); not part of what the example is
    index: int | None = field(default=None, compare=False, repr=False)


@dataclass
class DataStats:
    lines: int = 0  # records read (bad ones included): lines of JSONL, rows of the other kinds
    examples: int = 0  # usable sequences
    format: str = ""  # record format (chat, sharegpt, ...)
    source: str = ""  # file kind (jsonl, json, csv, parquet, dataset)
    skipped_bad_lines: int = 0
    first_bad_line: str = ""  # the first skipped record's error, so a skip is never silent
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    trainable_tokens: int = 0  # tokens that carry loss (predicted positions)
    # every readable record's length before truncation: HISTOGRAM_BINS bins up to max_seq_len, then longer
    length_histogram: list[int] = field(default_factory=lambda: [0] * (HISTOGRAM_BINS + 1))


@dataclass(frozen=True)
class DataOptions:
    """How a task's file is read; the TaskSpec keys of the same names."""

    data_format: str = "auto"
    on_bad_line: str = "error"  # error | skip
    truncation: str = "truncate"  # truncate | drop
    loss_on: str = "completion"  # completion | all

    @classmethod
    def of(cls, spec) -> "DataOptions":
        return cls(spec.data_format, spec.on_bad_line, spec.truncation, spec.loss_on)


class TokenizedData:
    """A task's examples, memory-mapped from the Arrow cache; indexing returns Examples."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.lengths = dataset["length"] if "length" in dataset.column_names else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self.dataset[int(index)]
        return Example(row["input_ids"], row["labels"], int(index))


# --- reading one file ------------------------------------------------------------------------------


def load_examples(path: Path, tokenizer, max_seq_len: int, key: str = "data",
                  options: DataOptions | None = None, cache_dir: Path | None = None) -> tuple[TokenizedData, DataStats]:
    """Tokenize a data file (or reuse its cached tokenization). A malformed record is an error naming
    the file and line or row, or is skipped and counted with `on_bad_line: skip`."""
    entry, stats = tokenize_file(path, tokenizer, max_seq_len, key, options, cache_dir)
    if not stats.examples:
        raise MuxTuneError(f"{path}: no usable examples ({stats.lines} records, {stats.skipped_bad_lines} bad, "
                           f"{stats.dropped_too_long} longer than max_seq_len={max_seq_len}, "
                           f"{stats.dropped_no_target} with no target tokens left within max_seq_len)")
    from datasets import Dataset

    return TokenizedData(Dataset.from_file(str(entry / "data.arrow"))), stats


def tokenize_file(path: Path, tokenizer, max_seq_len: int, key: str = "data", options: DataOptions | None = None,
                  cache_dir: Path | None = None) -> tuple[Path, DataStats]:
    """The file's cache entry (tokenized now unless already there) and its counts."""
    path = Path(path)
    options = options or DataOptions()
    sha = hashlib.sha256()
    try:
        content_digest(path, sha)
    except OSError as exc:
        raise MuxTuneError(f"{path}: cannot open data file ({key}): {exc.strerror}") from None
    settings = dict(version=CACHE_VERSION, tokenizer=_tokenizer_id(tokenizer), max_seq_len=max_seq_len,
                    **asdict(options))
    entry_key = hashlib.sha256(f"{sha.hexdigest()}|{json.dumps(settings, sort_keys=True)}".encode()).hexdigest()[:32]
    entry = Path(cache_dir or default_cache_dir()) / "data" / entry_key
    if not (entry / "stats.json").is_file():
        _tokenize_to_cache(path, tokenizer, max_seq_len, options, entry)
    return entry, DataStats(**json.loads((entry / "stats.json").read_text()))


def default_cache_dir() -> Path:
    return Path(os.environ.get("MUXTUNE_CACHE") or Path.cwd() / ".cache" / "muxtune")


def _tokenizer_id(tokenizer) -> str:
    inner = getattr(tokenizer, "tok", None)
    name = getattr(inner, "name_or_path", "") if inner is not None else ""
    template = getattr(inner, "chat_template", None) or ""
    return f"{type(tokenizer).__name__}:{name}:{tokenizer.vocab_size}:{hashlib.sha256(str(template).encode()).hexdigest()[:12]}"


def _tokenize_to_cache(path: Path, tokenizer, max_seq_len: int, options: DataOptions, entry: Path) -> None:
    """Stream the records into an Arrow file (written in batches by `datasets`' writer), then rename
    the finished entry into place: a crash or a bad record never leaves a half-written cache entry."""
    from datasets import Features, Sequence, Value
    from datasets.arrow_writer import ArrowWriter

    features = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                         "length": Value("int32")})

    # several processes of one job may tokenize the same file at once: the first entry in place stays
    with staged_directory(entry, keep_existing=True) as staging:
        stats = DataStats()
        with ArrowWriter(path=str(staging / "data.arrow"), features=features) as writer:
            for _, ex in _read_examples(path, tokenizer, max_seq_len, options, stats):
                writer.write({"input_ids": ex.input_ids, "labels": ex.labels, "length": len(ex.input_ids)})
            writer.finalize()
        (staging / "stats.json").write_text(json.dumps(asdict(stats)))


def _read_examples(path: Path, tokenizer, max_seq_len: int, options: DataOptions, stats: DataStats):
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    fmt = None if options.data_format == "auto" else options.data_format
    try:
        stats.source = source_kind(path)
    except OSError as exc:
        raise MuxTuneError(f"{path}: cannot open data file: {exc.strerror}") from None
    for where, record in read_records(path, stats.source):
        stats.lines += 1
        try:
            if isinstance(record, MuxTuneError):
                raise record
            fmt = fmt or detect(record, where)
            parts = pieces(record, fmt, tokenizer, where)
        except MuxTuneError as exc:
            if options.on_bad_line == "error":
                raise MuxTuneError(str(exc)) from None
            stats.skipped_bad_lines += 1
            stats.first_bad_line = stats.first_bad_line or str(exc)
            continue
        stats.format = fmt
        ids, labels = list(bos), [IGNORE] * len(bos)
        for tokens, trains in parts:
            ids += tokens
            labels += tokens if (trains or options.loss_on == "all" or fmt == "text") else [IGNORE] * len(tokens)
        ids, labels = ids + eos, labels + eos
        stats.length_histogram[_length_bin(len(ids), max_seq_len)] += 1
        if len(ids) > max_seq_len:
            if options.truncation == "drop":
                stats.dropped_too_long += 1
                continue
            stats.truncated += 1
            ids, labels = _truncate(ids, labels, len(bos), max_seq_len)
        # labels[0] is never predicted (nothing precedes it), so it cannot carry loss
        trainable = sum(label != IGNORE for label in labels[1:])
        if not trainable:
            stats.dropped_no_target += 1
            continue
        stats.examples += 1
        stats.tokens += len(ids)
        stats.trainable_tokens += trainable
        yield where, Example(ids, labels)


def example_origin(path: Path, tokenizer, max_seq_len: int, options: DataOptions, index: int) -> str:
    """Where the file's `index`-th usable example came from (`file:LINE`, or its row for other file
    kinds), by reading the file again as it was tokenized. Only asked for to name a corrupt example
    (a damaged cache row) in an error, so the cache keeps no line numbers."""
    try:
        for n, (where, _) in enumerate(_read_examples(Path(path), tokenizer, max_seq_len, options, DataStats())):
            if n == index:
                return where
    except MuxTuneError:  # the file itself changed or went bad since: say which example it was
        pass
    return f"{path}: example {index}"


def _length_bin(length: int, max_seq_len: int) -> int:
    if length > max_seq_len:
        return HISTOGRAM_BINS
    return min((length - 1) * HISTOGRAM_BINS // max_seq_len, HISTOGRAM_BINS - 1)


def _truncate(ids: list[int], labels: list[int], keep_head: int, max_seq_len: int):
    """Keep the target: drop the oldest tokens before the first target token first (after bos), then
    cut the end."""
    overflow = len(ids) - max_seq_len
    first_target = next((i for i, label in enumerate(labels) if label != IGNORE and i >= keep_head), len(ids))
    cut = max(0, min(overflow, first_target - keep_head))
    ids, labels = ids[:keep_head] + ids[keep_head + cut :], labels[:keep_head] + labels[keep_head + cut :]
    return ids[:max_seq_len], labels[:max_seq_len]


# --- a report on one file (`muxtune validate`, a service's upload check) ------------------------------

FORMAT_NAMES = {"chat": "chat (OpenAI messages)", "sharegpt": "sharegpt (conversations)",
                "prompt_completion": "prompt_completion", "alpaca": "alpaca", "text": "text"}


@dataclass
class FileReport:
    """What a task's file gives: its kind and format, examples, trainable tokens, what was dropped and
    why, and how long its sequences are against max_seq_len. Plain data (a service returns it as JSON)."""

    path: str
    source: str  # file kind: jsonl, json, csv, parquet, dataset
    format: str  # record format
    records: int
    examples: int
    tokens: int
    trainable_tokens: int
    truncated: int
    dropped: dict[str, int]  # why -> how many records gave no example
    first_bad_record: str
    max_seq_len: int
    length_histogram: list[tuple[int, int | None, int]]  # (shortest, longest or None: unbounded, count)

    @classmethod
    def of(cls, path: Path, stats: DataStats, max_seq_len: int, options: DataOptions | None = None) -> "FileReport":
        options = options or DataOptions()
        dropped = {"bad record (on_bad_line: skip)": stats.skipped_bad_lines,
                   f"longer than max_seq_len (truncation: {options.truncation})": stats.dropped_too_long,
                   "no target tokens within max_seq_len": stats.dropped_no_target}
        bins = []
        for k, count in enumerate(stats.length_histogram):
            if k == HISTOGRAM_BINS:
                bins.append((max_seq_len + 1, None, count))
            else:  # the lengths l with (l - 1) * BINS // max_seq_len == k (see _length_bin)
                shortest = -(-k * max_seq_len // HISTOGRAM_BINS) + 1  # ceil(k * max_seq_len / BINS) + 1
                bins.append((shortest, -(-(k + 1) * max_seq_len // HISTOGRAM_BINS), count))
        return cls(str(path), stats.source, stats.format, stats.lines, stats.examples, stats.tokens,
                   stats.trainable_tokens, stats.truncated, {k: v for k, v in dropped.items() if v},
                   stats.first_bad_line, max_seq_len, bins)

    def text(self, width: int = 40) -> str:
        fmt = FORMAT_NAMES.get(self.format, self.format or "unknown (no record read)")
        lines = [f"{self.path}: {self.source} file, {fmt} format",
                 f"  {self.records} records -> {self.examples} examples, {self.tokens} tokens "
                 f"({self.trainable_tokens} trainable), {self.truncated} truncated to max_seq_len={self.max_seq_len}"]
        for why, count in self.dropped.items():
            lines.append(f"  dropped {count}: {why}")
        if self.first_bad_record:
            lines.append(f"  first bad record: {self.first_bad_record}")
        lines.append(f"  lengths in tokens (before truncation) vs max_seq_len={self.max_seq_len}:")
        most = max([count for _, _, count in self.length_histogram] + [1])
        for lo, hi, count in self.length_histogram:
            if hi is not None and hi < lo:
                continue  # max_seq_len < bins: some bins hold no length
            label = f"{lo}-{hi}" if hi is not None else f"> {self.max_seq_len}"
            bar = "#" * (count * width // most if count else 0) or ("." if count else "")
            lines.append(f"    {label:>13} | {bar:<{width}} {count}")
        return "\n".join(lines)


def inspect_file(path: Path, tokenizer, max_seq_len: int, options: DataOptions | None = None,
                 cache_dir: Path | None = None) -> FileReport:
    """Read and tokenize one file (into the cache training reuses) and report on it. Raises
    MuxTuneError on a bad record with `on_bad_line: error`; a file with no usable example is a report
    with examples == 0, not an error."""
    _, stats = tokenize_file(path, tokenizer, max_seq_len, options=options, cache_dir=cache_dir)
    return FileReport.of(path, stats, max_seq_len, options)


@dataclass
class TaskSampler:
    """Endless seeded order over one task's examples: a fresh permutation each epoch; a batch may span
    two epochs. Its state (epoch, cursor, generator) is all a resume needs."""

    examples: list[Example] | TokenizedData
    batch_size: int
    seed: int
    epoch: int = 0
    cursor: int = 0
    order: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(stream_seed(self.seed, DATA_STREAM))
        self.order = self._permutation()

    def _permutation(self) -> list[int]:
        return torch.randperm(len(self.examples), generator=self.generator).tolist()

    def next_index(self) -> int:
        if self.cursor == len(self.order):
            self.epoch, self.cursor, self.order = self.epoch + 1, 0, self._permutation()
        self.cursor += 1
        return self.order[self.cursor - 1]

    def next_batch(self) -> list[Example]:
        return [self.examples[self.next_index()] for _ in range(self.batch_size)]


@dataclass
class FusedBatch:
    input_ids: torch.Tensor  # [rows, seq]
    attention_mask: torch.Tensor  # [rows, seq]
    labels: torch.Tensor  # [rows, seq]
    segments: list[Segment]

    @property
    def tokens_per_task(self) -> dict[str, int]:
        return {s.task: int(self.attention_mask[s.start : s.end].sum()) for s in self.segments}

    @property
    def computed_per_task(self) -> dict[str, int]:
        return {s.task: (s.end - s.start) * self.input_ids.shape[1] for s in self.segments}

    @property
    def target_counts(self) -> dict[str, int]:
        valid = self.labels[:, 1:] != IGNORE
        return {s.task: int(valid[s.start : s.end].sum()) for s in self.segments}


def fuse(batches: dict[str, list[Example]], pad_id: int, device="cpu", lead: dict[str, int] | None = None) -> FusedBatch:
    """Stack every task's sequences into one [rows, seq] micro-batch, right-padded to the longest row;
    each task's rows are contiguous (its segment). `lead[task]` slots at the start of a task's rows
    are reserved for virtual tokens (prompt tuning): attended to, no data, no loss."""
    lead = lead or {}
    rows = [(lead.get(task, 0), ex) for task, examples in batches.items() for ex in examples]
    seq = max(skip + len(ex.input_ids) for skip, ex in rows)
    input_ids = torch.full((len(rows), seq), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), seq), dtype=torch.long)
    for i, (skip, ex) in enumerate(rows):
        n = skip + len(ex.input_ids)
        input_ids[i, skip:n] = torch.tensor(ex.input_ids)
        labels[i, skip:n] = torch.tensor(ex.labels)
        mask[i, :n] = 1
    segments, start = [], 0
    for task, examples in batches.items():
        segments.append(Segment(task, start, start + len(examples)))
        start += len(examples)
    return FusedBatch(input_ids.to(device), mask.to(device), labels.to(device), segments)
