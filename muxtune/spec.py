"""The one place a task, a run config and a plan are defined. Every part of MuxTune takes these objects.

A config file is YAML validated by pydantic; every error names the file, the key path and (where the
YAML has one) the line, e.g. `quickstart.yaml:12: tasks[1].peft.r: Input should be greater than 0`.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from muxtune.errors import MuxTuneError
from muxtune.methods import METHODS, PeftConfig
from muxtune.method_card import MethodCard

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # names become folder names under runs/<name>/
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # RunConfig.dtype: the backbone's weight type


def matching(pattern: str, expected: str) -> AfterValidator:
    """A string field's check: stripped, the value must match `pattern` whole; else the error says `expected`."""
    def check(value: str) -> str:
        if not re.fullmatch(pattern, value.strip()):
            raise ValueError(expected)
        return value.strip()
    return AfterValidator(check)


class EarlyStopping(BaseModel):
    """Stop a task once its valid_loss has not improved by more than `min_delta` for `patience`
    evaluations in a row; its exported adapter is then its best one (lowest valid_loss)."""

    model_config = ConfigDict(extra="forbid")
    patience: int = Field(3, ge=1, description="evaluations without improvement before the task stops")
    min_delta: float = Field(0.0, ge=0, description="how much lower than the best valid_loss counts as better")


EVALUATIONS_BY_DEFAULT = 10  # without eval_every a task is evaluated about this often (and at its end)


class TaskSpec(BaseModel):
    """One tenant's fine-tuning job. Its length is `steps`, or `epochs` passes over its training
    examples (exactly one of the two)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN, max_length=100)
    data: Path
    peft: PeftConfig
    batch_size: int = Field(8, ge=1, description="sequences per optimizer step")
    max_seq_len: int = Field(256, ge=4, le=1_000_000)
    lr: float = Field(2e-4, gt=0)
    steps: int | None = Field(None, ge=1, description="optimizer steps (or set epochs)")
    epochs: float | None = Field(None, gt=0, description="passes over the training examples (or set steps); "
                                 "steps = ceil(epochs * examples / batch_size), the last batch may be smaller")
    seed: int = 0
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="per-task gradient clipping; null disables")
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    # how the data file is read (executor/data.py)
    data_format: Literal["auto", "chat", "sharegpt", "prompt_completion", "alpaca", "text"] = Field(
        "auto", description="record format (the file kind, JSONL/JSON/CSV/Parquet/saved dataset, is detected)")
    loss_on: Literal["completion", "all"] = Field("completion", description="completion: loss only on "
                                                  "completion / output / assistant tokens")
    on_bad_line: Literal["error", "skip"] = "error"
    truncation: Literal["truncate", "drop"] = Field("truncate", description="what happens to a sequence "
                                                    "longer than max_seq_len")
    # validation (executor/validation.py): a file of its own, or a seeded share of `data` kept out of training
    validation_data: Path | None = Field(None, description="a JSONL file in any of the data formats")
    validation_split: float | None = Field(None, gt=0, le=0.5, description="fraction of `data` held out "
                                           "for validation, chosen by the task's seed")
    eval_every: int | None = Field(None, ge=1, description="steps between evaluations (default: about "
                                   f"{EVALUATIONS_BY_DEFAULT} per task); a task is also evaluated at its end")
    early_stopping: EarlyStopping | None = None

    @model_validator(mode="after")
    def _consistent_length_and_validation(self) -> "TaskSpec":
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of steps and epochs (a task's length), got "
                             + ("both" if self.steps is not None else "neither"))
        if self.validation_data is not None and self.validation_split is not None:
            raise ValueError("set validation_data or validation_split, not both")
        if not self.validates and (self.eval_every is not None or self.early_stopping is not None):
            key = "early_stopping" if self.early_stopping is not None else "eval_every"
            raise ValueError(f"{key} needs validation data: set validation_data or validation_split")
        return self

    @property
    def validates(self) -> bool:
        return self.validation_data is not None or self.validation_split is not None

    def examples_to_train(self, n_examples: int) -> int | None:
        """How many examples an epochs task draws in all (every one exactly `epochs` times when it is
        whole); None for a steps task (it draws batch_size per step, however many there are)."""
        # float noise (0.1 * 30 = 3.0000000000000004) must not add an example
        return None if self.epochs is None else max(1, math.ceil(self.epochs * n_examples - 1e-9))

    def held_out(self, n_file_examples: int) -> int:
        """How many of the data file's examples `validation_split` keeps for validation (at least one)."""
        return 0 if self.validation_split is None else max(1, round(self.validation_split * n_file_examples))

    def step_count(self, n_examples: int) -> int:
        """The task's optimizer steps on `n_examples` training examples."""
        if self.steps is not None:
            return self.steps
        return math.ceil(self.examples_to_train(n_examples) / self.batch_size)

    def eval_interval(self, total_steps: int) -> int | None:
        """Steps between evaluations (None: no validation)."""
        if not self.validates:
            return None
        return self.eval_every or max(1, math.ceil(total_steps / EVALUATIONS_BY_DEFAULT))


def method_card(method: str) -> MethodCard:
    """The plain-data card of a PEFT method (muxtune/method_card.py), by its `peft.method` name."""
    if method not in METHODS:
        raise MuxTuneError(f"unknown method {method!r} (peft.method); expected one of {sorted(METHODS)}")
    return METHODS[method].CARD


def method_rank(peft) -> int:
    """The size knob of a PEFT config (LoRA/DoRA r, adapter size, virtual tokens; 0 if none): what the
    CostModel's TaskLoad.rank means. Not a process rank."""
    for key in ("r", "size", "num_virtual_tokens"):
        if hasattr(peft, key):
            return int(getattr(peft, key))
    return 0


class Cluster(BaseModel):
    """The devices a plan may use (planner/): how many, how much memory each, which hardware.
    `hardware` names the CostModel: "this" = this machine's measured profile, else a row of the
    profiler's hardware catalog (h100, a100-80gb, ...) priced analytically; links come from the CostModel."""

    model_config = ConfigDict(extra="forbid")
    devices: int = Field(1, ge=1, le=4096, description="devices (GPUs, or CPU processes) in the cluster")
    memory_gib: float = Field(gt=0, description="memory of one device")
    hardware: str = Field("this", description="'this' (measured profile) or a hardware catalog name")


class RunConfig(BaseModel):
    """A whole config file: the shared backbone, the devices, and the tenants' tasks."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN, max_length=100)
    model: str = "builtin:tiny-llama"
    devices: Annotated[str, matching(r"cpu|cuda(:\d+(,\d+)*)?", "expected 'cpu', 'cuda' or 'cuda:0,1,...'")] = "cpu"
    dtype: Literal[tuple(DTYPE_BYTES)] = "float32"
    tasks: list[TaskSpec] = Field(min_length=1)
    checkpoint_every: int = Field(10, ge=0, description="steps between per-task checkpoints "
                                  "(runs/<name>/checkpoints/); 0: only at the end")
    memory_limit_gib: float | None = Field(None, gt=0, description="admission: refuse a plan or a submitted "
                                           "task predicted to need more (default: the device's free memory)")
    cluster: Cluster | None = Field(None, description="what `muxtune plan` plans for (default: this machine)")

    @model_validator(mode="after")
    def _unique_task_names(self) -> "RunConfig":
        seen: set[str] = set()
        for task in self.tasks:
            if task.name in seen:
                raise ValueError(f"task name {task.name!r} is used twice")
            seen.add(task.name)
        return self

    def device_list(self) -> list[str]:
        if self.devices == "cpu":
            return ["cpu"]
        if self.devices == "cuda":
            return ["cuda:0"]
        return [f"cuda:{i}" for i in self.devices.split(":", 1)[1].split(",")]

    def task(self, name: str) -> TaskSpec:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(name)


# --- plans -----------------------------------------------------------------------------------------

PLAN_VERSION = 2  # v2 added Layout.stage_layers and Plan.schedule; v1 files load with their defaults


class Layout(BaseModel):
    """How a group's devices are used. `FusionGroup.devices` lists dp*pp*tp devices, replica-major:
    replica r, stage s, tensor rank t is devices[(r * pp + s) * tp + t]."""

    model_config = ConfigDict(extra="forbid")
    dp: int = Field(1, ge=1, description="data-parallel replicas")
    pp: int = Field(1, ge=1, description="pipeline stages")
    tp: int = Field(1, ge=1, description="tensor-parallel degree")
    stage_layers: list[int] | None = Field(None, description="transformer layers of each pipeline stage; "
                                           "null splits evenly (earlier stages take the remainder)")

    @model_validator(mode="after")
    def _one_split_per_stage(self) -> "Layout":
        if self.stage_layers is not None and (len(self.stage_layers) != self.pp or min(self.stage_layers) < 1):
            raise ValueError(f"stage_layers needs pp={self.pp} positive layer counts, got {self.stage_layers}")
        return self


class FusionGroup(BaseModel):
    """Tasks whose tokens share every backbone op call (spatial multiplexing)."""

    model_config = ConfigDict(extra="forbid")
    tasks: list[str] = Field(min_length=1)
    devices: list[str] = Field(min_length=1)
    layout: Layout = Field(default_factory=Layout)
    micro_batches: int = Field(1, ge=1)
    # memory knobs (executor/recompute.py, executor/accumulation.py; priced by profiler/memory_knobs.py)
    recompute: bool = Field(False, description="recompute every transformer block's activations in the "
                            "backward: only a block's input is kept between forward and backward")
    accumulation: dict[str, int] = Field(default_factory=dict, description="task -> micro-steps its "
                                         "batch_size sequences are fed over per optimizer step (default 1)")

    @model_validator(mode="after")
    def _devices_match_layout(self) -> "FusionGroup":
        need = self.layout.dp * self.layout.pp * self.layout.tp
        if len(self.devices) != need:
            raise ValueError(f"layout dp*pp*tp = {need} needs {need} devices, got {len(self.devices)}")
        for name, steps in self.accumulation.items():
            if name not in self.tasks:
                raise ValueError(f"accumulation: task {name!r} is not in this group")
            if steps < 1:
                raise ValueError(f"accumulation: task {name!r} needs at least 1 micro-step, got {steps}")
        return self

    def accumulation_of(self, name: str) -> int:
        """Micro-steps task `name` feeds its batch over (1: the whole batch at once)."""
        return self.accumulation.get(name, 1)


class Alignment(BaseModel):
    """How a fusion group's sequences are laid out in its micro-batches (executor/alignment.py).
    chunked: fixed-size chunks, sequences packed end to end, each task padded only to a whole chunk;
    padded: one row per sequence, right-padded to the longest row (the mLoRA-style baseline)."""

    model_config = ConfigDict(extra="forbid")
    layout: Literal["chunked", "padded"] = "chunked"
    chunk_len: int = Field(16, ge=1, le=65536, description="tokens per chunk row")
    token_budget: int = Field(16384, ge=1, description="most tokens (padding included) in one micro-batch; "
                                                        "a step's sequences beyond it go to the next one")


class Plan(BaseModel):
    """What runs together and how. The executor carries it out; it never decides this itself."""

    model_config = ConfigDict(extra="forbid")
    version: Literal[2] = PLAN_VERSION
    planner: str = "trivial"
    groups: list[FusionGroup] = Field(min_length=1)
    # Groups on the same devices share one pipeline. "1f1b": they run one after another, each its own
    # 1F1B with a flush; "interleaved": their micro-batches alternate in one 1F1B, so one group's
    # compute fills another's bubbles and hides its transfers (temporal multiplexing).
    schedule: Literal["1f1b", "interleaved"] = "1f1b"
    alignment: Alignment = Field(default_factory=Alignment)
    explanation: str = ""

    @model_validator(mode="before")
    @classmethod
    def _upgrade_v1(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("version") == 1:
            raw = {**raw, "version": 2}  # v1 had no stage split nor schedule: the defaults are v1's meaning
        return raw

    @classmethod
    def trivial(cls, config: RunConfig) -> "Plan":
        """All tasks fused in one group on the first device."""
        return cls(
            planner="trivial",
            groups=[FusionGroup(tasks=[t.name for t in config.tasks], devices=config.device_list()[:1])],
            explanation="all tasks fused on one device (the only layout the single-process executor runs)",
        )

    def check_against(self, config: RunConfig, source: str = "plan") -> None:
        names = [t for g in self.groups for t in g.tasks]
        known = {t.name for t in config.tasks}
        for name in names:
            if name not in known:
                raise MuxTuneError(f"{source}: task {name!r} is not in the config")
        if len(names) != len(set(names)):
            raise MuxTuneError(f"{source}: a task appears in more than one group")
        missing = known - set(names)
        if missing:
            raise MuxTuneError(f"{source}: tasks {sorted(missing)} are in no group")

    def save(self, path: Path) -> None:
        write_text_atomic(path, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Plan":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise MuxTuneError(f"{path}: no such plan file") from None
        except json.JSONDecodeError as exc:
            raise MuxTuneError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise MuxTuneError(_format_validation(path, exc, None)) from None


# --- loading config files --------------------------------------------------------------------------


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a config file. Relative data paths resolve against the config's folder first,
    then the working directory; a missing data file is reported with the key that names it."""
    path = Path(path)
    config, root = load_yaml_model(path, RunConfig, "config file", "with keys name, model, devices, tasks")
    for i, task in enumerate(config.tasks):
        _resolve_task_data(path, task, root, ("tasks", i))
    return config


def load_task(path: str | Path) -> TaskSpec:
    """Read one task file (a YAML mapping of TaskSpec keys), as `muxtune submit` sends it."""
    path = Path(path)
    task, root = load_yaml_model(path, TaskSpec, "task file", "of task keys (name, data, peft, ...)")
    _resolve_task_data(path, task, root, ())
    return task


def load_yaml_model(path: Path, model: type[BaseModel], what: str, keys: str, empty_ok: bool = False):
    """Read a YAML mapping and validate it as `model`; every error names the file and, where it has them,
    the key and line. Returns the object and the YAML node tree (to place a later error on its line)."""
    raw, root = _read_yaml(path, what)
    if raw is None and empty_ok:
        raw = {}
    if not isinstance(raw, dict):
        raise MuxTuneError(f"{path}: expected a mapping {keys}")
    try:
        return model.model_validate(raw), root
    except ValidationError as exc:
        raise MuxTuneError(_format_validation(path, exc, root)) from None


def _resolve_task_data(path: Path, task: TaskSpec, root, loc: tuple):
    """A task's data files, each found against the config's folder, then the working directory."""
    for key in ("data", "validation_data"):
        if getattr(task, key) is not None:
            setattr(task, key, _resolve_data(path, getattr(task, key), _loc_str((*loc, key)), root, (*loc, key)))


def _read_yaml(path: Path, what: str):
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise MuxTuneError(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MuxTuneError(f"{path}: cannot read {what}: {exc}") from None
    try:
        return yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise MuxTuneError(f"{where}: not valid YAML: {problem}") from None


def _resolve_data(config_path: Path, data: Path, key: str, root, loc) -> Path:
    if data.is_absolute():
        candidates = [data]
    else:
        candidates = [config_path.parent / data, Path.cwd() / data]
    for candidate in candidates:
        if candidate.is_file() or candidate.is_dir():  # a folder: a dataset saved with save_to_disk
            return candidate.resolve()
    line = _line_of(root, loc)
    where = f"{config_path}:{line}" if line else str(config_path)
    tried = ", ".join(str(c) for c in candidates)
    raise MuxTuneError(f"{where}: {key}: data file not found (tried {tried})")


def _format_validation(path: Path, exc: ValidationError, root) -> str:
    lines = []
    for err in exc.errors():
        loc = [p for p in err["loc"] if not _is_union_tag(p)]
        key = _loc_str(loc) or "(top level)"
        line = _line_of(root, loc) if root is not None else None
        where = f"{path}:{line}" if line else str(path)
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{where}: {key}: {message}")
    return "\n".join(lines)


def _is_union_tag(part: Any) -> bool:
    # pydantic inserts the discriminator value (e.g. 'lora') into the loc of a tagged union
    return isinstance(part, str) and part in METHODS


def _loc_str(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_of(node, loc) -> int | None:
    """1-based line of the YAML node at `loc`, or of its nearest existing parent."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if k.value == part]
            key = [k for k, v in node.value if k.value == part]
            if not match:
                return line
            line = key[0].start_mark.line + 1
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


# --- small shared I/O ------------------------------------------------------------------------------


@contextlib.contextmanager
def staged_directory(out_dir: Path, keep_existing: bool = False):
    """Yield a hidden staging folder beside `out_dir`; on success it replaces `out_dir` by a rename,
    on any failure it is removed: readers never see a half-written folder. keep_existing: a folder
    another process put in place meanwhile wins and the staged copy is dropped (content-addressed
    caches: the same key is the same content, and deleting it could pull it from under a reader)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        yield staging
        if keep_existing:
            try:
                staging.rename(out_dir)  # fails when a non-empty out_dir is already there
            except OSError:
                if not out_dir.exists():
                    raise
                shutil.rmtree(staging, ignore_errors=True)
            return
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a crash never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
