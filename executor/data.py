"""Task data: JSONL in, tokenized examples (cached on disk, memory-mapped) out, a seeded per-task order,
and the padded fused micro-batch (the chunk-aligned one is in alignment.py).

Formats, one JSON object per line, detected from a file's first record or set with `data_format`:
  chat               {"messages": [{"role": "system|user|assistant", "content": ...}, ...]}
  prompt_completion  {"prompt": ..., "completion": ...}
  alpaca             {"instruction": ..., "input": ... (optional), "output": ...}
  text               {"text": ...}
With `loss_on: completion` only the completion / output / assistant tokens (and the closing eos) carry
loss; `text` always trains on every token; `loss_on: all` trains on every token of every format.
Chat: a real model with a chat template renders it with its template; builtins (byte tokenizer) use a
plain "role: content" rendering.

A sequence is [bos] + tokens + [eos]. One longer than max_seq_len is either truncated (it loses the
oldest tokens before its first target token, then the end) or dropped (`truncation: drop`); both counted.

Tokenized data is written once per (file content, tokenizer, settings) to an Arrow file under the
cache folder (`MUXTUNE_CACHE`, default `.cache/muxtune/` in the working directory) with HF `datasets`'
writer, and read back memory-mapped: a large file is never held as a Python list.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from muxtune.errors import MuxTuneError
from muxtune.executor.mux import DATA_STREAM, Segment, stream_seed
from muxtune.spec import staged_directory

IGNORE = -100  # label of a token that carries no loss (HF convention)
FORMATS = ("chat", "prompt_completion", "alpaca", "text")
CACHE_VERSION = 1  # bump when tokenization changes, so old cache entries are not reused
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss; else equal to input_ids (the model shifts)


@dataclass
class DataStats:
    lines: int = 0  # records read (bad ones included)
    examples: int = 0  # usable sequences
    format: str = ""
    skipped_bad_lines: int = 0
    first_bad_line: str = ""  # the first skipped line's error, so a skip is never silent
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    tokens: int = 0


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
        return Example(row["input_ids"], row["labels"])


# --- reading one file ------------------------------------------------------------------------------


def load_examples(path: Path, tokenizer, max_seq_len: int, key: str = "data",
                  options: DataOptions | None = None, cache_dir: Path | None = None) -> tuple[TokenizedData, DataStats]:
    """Tokenize a JSONL file (or reuse its cached tokenization). A malformed line is an error naming
    the file and line, or is skipped and counted with `on_bad_line: skip`."""
    path = Path(path)
    options = options or DataOptions()
    try:
        digest = _file_digest(path)
    except OSError as exc:
        raise MuxTuneError(f"{path}: cannot open data file ({key}): {exc.strerror}") from None
    settings = dict(version=CACHE_VERSION, tokenizer=_tokenizer_id(tokenizer), max_seq_len=max_seq_len,
                    **asdict(options))
    entry_key = hashlib.sha256(f"{digest}|{json.dumps(settings, sort_keys=True)}".encode()).hexdigest()[:32]
    entry = Path(cache_dir or default_cache_dir()) / "data" / entry_key
    if not (entry / "stats.json").is_file():
        _tokenize_to_cache(path, tokenizer, max_seq_len, options, entry)
    from datasets import Dataset

    stats = DataStats(**json.loads((entry / "stats.json").read_text()))
    if not stats.examples:
        raise MuxTuneError(f"{path}: no usable examples ({stats.lines} lines, {stats.skipped_bad_lines} bad, "
                           f"{stats.dropped_too_long} longer than max_seq_len={max_seq_len}, "
                           f"{stats.dropped_no_target} with no target tokens left within max_seq_len)")
    return TokenizedData(Dataset.from_file(str(entry / "data.arrow"))), stats


def default_cache_dir() -> Path:
    return Path(os.environ.get("MUXTUNE_CACHE") or Path.cwd() / ".cache" / "muxtune")


def _file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _tokenizer_id(tokenizer) -> str:
    inner = getattr(tokenizer, "tok", None)
    name = getattr(inner, "name_or_path", "") if inner is not None else ""
    template = getattr(inner, "chat_template", None) or ""
    return f"{type(tokenizer).__name__}:{name}:{tokenizer.vocab_size}:{hashlib.sha256(str(template).encode()).hexdigest()[:12]}"


def _tokenize_to_cache(path: Path, tokenizer, max_seq_len: int, options: DataOptions, entry: Path) -> None:
    """Stream the file line by line into an Arrow file (written in batches by `datasets`' writer), then
    rename the finished entry into place: a crash never leaves a half-written cache entry."""
    from datasets import Features, Sequence, Value
    from datasets.arrow_writer import ArrowWriter

    features = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                         "length": Value("int32")})

    # several processes of one job may tokenize the same file at once: the first entry in place stays
    with staged_directory(entry, keep_existing=True) as staging:
        stats = DataStats()
        with ArrowWriter(path=str(staging / "data.arrow"), features=features) as writer:
            for ex in _read_examples(path, tokenizer, max_seq_len, options, stats):
                writer.write({"input_ids": ex.input_ids, "labels": ex.labels, "length": len(ex.input_ids)})
            writer.finalize()
        (staging / "stats.json").write_text(json.dumps(asdict(stats)))


def _read_examples(path: Path, tokenizer, max_seq_len: int, options: DataOptions, stats: DataStats):
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    fmt = None if options.data_format == "auto" else options.data_format
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            stats.lines += 1
            try:
                record = _parse(raw, path, lineno)
                fmt = fmt or _detect(record, path, lineno)
                pieces = _pieces(record, fmt, tokenizer, path, lineno)
            except MuxTuneError as exc:
                if options.on_bad_line == "error":
                    raise
                stats.skipped_bad_lines += 1
                stats.first_bad_line = stats.first_bad_line or str(exc)
                continue
            stats.format = fmt
            ids, labels = list(bos), [IGNORE] * len(bos)
            for tokens, trains in pieces:
                ids += tokens
                labels += tokens if (trains or options.loss_on == "all" or fmt == "text") else [IGNORE] * len(tokens)
            ids, labels = ids + eos, labels + eos
            if len(ids) > max_seq_len:
                if options.truncation == "drop":
                    stats.dropped_too_long += 1
                    continue
                stats.truncated += 1
                ids, labels = _truncate(ids, labels, len(bos), max_seq_len)
            # labels[0] is never predicted (nothing precedes it), so it cannot carry loss
            if all(label == IGNORE for label in labels[1:]):
                stats.dropped_no_target += 1
                continue
            stats.examples += 1
            stats.tokens += len(ids)
            yield Example(ids, labels)


def _truncate(ids: list[int], labels: list[int], keep_head: int, max_seq_len: int):
    """Keep the target: drop the oldest tokens before the first target token first (after bos), then
    cut the end."""
    overflow = len(ids) - max_seq_len
    first_target = next((i for i, label in enumerate(labels) if label != IGNORE and i >= keep_head), len(ids))
    cut = max(0, min(overflow, first_target - keep_head))
    ids, labels = ids[:keep_head] + ids[keep_head + cut :], labels[:keep_head] + labels[keep_head + cut :]
    return ids[:max_seq_len], labels[:max_seq_len]


def _parse(raw: bytes, path: Path, lineno: int) -> dict:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MuxTuneError(f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MuxTuneError(f"{path}:{lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(record, dict):
        raise MuxTuneError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    return record


FORMAT_KEYS = {"chat": {"messages"}, "prompt_completion": {"prompt", "completion"},
               "alpaca": {"instruction", "output"}, "text": {"text"}}


def _detect(record: dict, path: Path, lineno: int) -> str:
    for fmt, keys in FORMAT_KEYS.items():
        if keys & set(record):
            return fmt
    raise MuxTuneError(f"{path}:{lineno}: cannot tell the data format from keys {sorted(record)}; expected "
                       "'messages' (chat), 'prompt'/'completion', 'instruction'/'input'/'output' (alpaca) or "
                       "'text' (or set data_format)")


def _pieces(record: dict, fmt: str, tokenizer, path: Path, lineno: int) -> list[tuple[list[int], bool]]:
    """The record as (token ids, carries loss with loss_on=completion) pieces in order."""
    if not FORMAT_KEYS[fmt] & set(record):
        raise MuxTuneError(f"{path}:{lineno}: expected a {fmt} record (keys {sorted(FORMAT_KEYS[fmt])}), got keys "
                           f"{sorted(record)}; a file holds one format")
    if fmt == "text":
        return [(tokenizer.encode(_str_field(record, "text", path, lineno)), True)]
    if fmt == "prompt_completion":
        return [(tokenizer.encode(_str_field(record, "prompt", path, lineno)), False),
                (tokenizer.encode(_str_field(record, "completion", path, lineno)), True)]
    if fmt == "alpaca":
        instruction = _str_field(record, "instruction", path, lineno)
        extra = _str_field(record, "input", path, lineno) if "input" in record else ""
        prompt = (ALPACA_PROMPT_INPUT if extra else ALPACA_PROMPT).format(instruction=instruction, input=extra)
        return [(tokenizer.encode(prompt), False), (tokenizer.encode(_str_field(record, "output", path, lineno)), True)]
    return _chat_pieces(_messages(record, path, lineno), tokenizer, path, lineno)


def _messages(record: dict, path: Path, lineno: int) -> list[dict]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise MuxTuneError(f"{path}:{lineno}: 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                or message.get("role") not in ("system", "user", "assistant"):
            raise MuxTuneError(f"{path}:{lineno}: messages[{i}] must be {{'role': 'system'|'user'|'assistant', "
                               "'content': str}")
    if not any(m["role"] == "assistant" for m in messages):
        raise MuxTuneError(f"{path}:{lineno}: messages has no 'assistant' turn to train on")
    return messages


def _chat_pieces(messages: list[dict], tokenizer, path: Path, lineno: int) -> list[tuple[list[int], bool]]:
    inner = getattr(tokenizer, "tok", None)
    if inner is not None and getattr(inner, "chat_template", None):
        # The model's own template renders the text; an assistant turn is the text the template adds
        # after the conversation so far (rendered prefix by prefix, which works for any template).
        # Tokenizing the whole text once and marking tokens by character offsets keeps the
        # tokenizer's merges across turn boundaries exactly as the model sees them.
        full = _render(inner, messages, generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                before = _render(inner, messages[:i], generation_prompt=True)
                after = _render(inner, messages[: i + 1], generation_prompt=False)
                if not (after.startswith(before) and full.startswith(after)):
                    raise MuxTuneError(f"{path}:{lineno}: the model's chat template does not render this "
                                       "conversation prefix by prefix; use loss_on: all")
                spans.append((len(before), len(after)))
        encoded = inner(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        if ids and ids[0] == tokenizer.bos_token_id:  # the template wrote bos itself; we add it anyway
            ids, offsets = ids[1:], offsets[1:]
        pieces = []
        for token, (lo, hi) in zip(ids, offsets):
            trains = any(lo < b and a < max(hi, lo + 1) for a, b in spans)  # overlaps an assistant turn
            if pieces and pieces[-1][1] == trains:
                pieces[-1][0].append(token)
            else:
                pieces.append(([token], trains))
        return pieces
    # builtins: a plain rendering, "role: content" per line; loss on each assistant turn's content
    pieces = []
    for message in messages:
        pieces.append((tokenizer.encode(f"{message['role']}: "), False))
        pieces.append((tokenizer.encode(message["content"] + "\n"), message["role"] == "assistant"))
    return pieces


def _render(tok, messages: list[dict], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _str_field(record: dict, key: str, path: Path, lineno: int) -> str:
    if key not in record:
        raise MuxTuneError(f"{path}:{lineno}: missing '{key}'")
    if not isinstance(record[key], str):
        raise MuxTuneError(f"{path}:{lineno}: '{key}' must be a string")
    return record[key]


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
