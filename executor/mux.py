"""Spatial multiplexing: one frozen backbone op runs once over the rows of every task in a fused
micro-batch, and each task's adapter touches only its own rows.

`Multiplexer` owns the per-task adapters and knows the row segments of the micro-batch in flight;
each target op of the backbone is replaced in place by a `MultiplexedOp` that reads those segments.
The backbone itself is never copied and never receives gradients: its backward computes only dX.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from muxtune.errors import MuxTuneError
from muxtune.executor.backbone import target_ops
from muxtune.executor.peft import method_of

# Distinct streams from one task seed: the adapter init, the data order, the dropout masks and the
# validation split each depend on the task's seed alone, never on which other tasks share the backbone.
INIT_STREAM, DATA_STREAM, DROPOUT_STREAM, SPLIT_STREAM = 0, 1, 2, 3


def stream_seed(seed: int, stream: int) -> int:
    return (seed * 0x9E3779B1 + stream * 0x85EBCA77) % (2**63)


@dataclass(frozen=True)
class Segment:
    """Rows [start, end) of the fused micro-batch belong to `task`."""

    task: str
    start: int
    end: int


class TaskAdapter(nn.Module):
    """All of one task's adapter layers (one per target op), plus the task's dropout generator."""

    def __init__(self, name: str, peft_config, model: nn.Module, seed: int, max_seq_len: int, device):
        super().__init__()
        self.name, self.config, self.max_seq_len = name, peft_config, max_seq_len
        self.method = method_of(peft_config)
        if hasattr(self.method, "resolve"):  # fill model-dependent defaults (e.g. IA3's target modules)
            try:
                peft_config = self.config = self.method.resolve(peft_config, model)
            except MuxTuneError as exc:
                raise MuxTuneError(f"task {name!r}: {exc}") from None
        init_gen = torch.Generator().manual_seed(stream_seed(seed, INIT_STREAM))
        self.paths, self.layers, self.sequence = [], nn.ModuleDict(), None
        self.dropout_gen = None
        if hasattr(self.method, "build_sequence"):
            # sequence-level methods (prompt, prefix) change what the task's rows see, not any op
            self.sequence = self.method.build_sequence(peft_config, model, max_seq_len, init_gen, name)
            self.to(device=device, dtype=torch.float32)
            return
        ops = target_ops(model, peft_config.target_modules)
        if not ops:
            raise MuxTuneError(
                f"task {name!r}: peft.target_modules: {peft_config.target_modules} match no Linear/Conv1D op "
                f"of the backbone; it has e.g. {sorted(_leaf_op_names(model))[:12]}"
            )
        self.paths = [path for path, _ in ops]
        for path, op in ops:
            base = op.base_op if isinstance(op, MultiplexedOp) else op
            # adapters train in fp32 whatever the backbone's dtype, as HF PEFT does by default
            layer = self.layers[_key(path)] = self.method.build_layer(peft_config, base, path, init_gen)
            if any(t.is_meta for t in [*layer.parameters(), *layer.buffers()]):
                # an op that another pipeline stage holds (a task joining mid-run, after this stage dropped
                # the other layers' weights): the init stream was drawn as on the full model, so this
                # stage's own layers get the init they would get alone; this one only needs its shapes
                layer.to_empty(device=device)
                with torch.no_grad():
                    for tensor in [*layer.parameters(), *layer.buffers()]:
                        tensor.zero_()
        self.to(device=device, dtype=torch.float32)
        self.dropout_gen = torch.Generator(device=device).manual_seed(stream_seed(seed, DROPOUT_STREAM))

    @property
    def lead_tokens(self) -> int:
        """Slots at the start of this task's rows that hold no data token (prompt tuning's virtual tokens)."""
        return getattr(self.sequence, "lead_tokens", 0)

    @property
    def prefix_tokens(self) -> int:
        """Length of this task's KV prefix in every attention layer (prefix tuning)."""
        return getattr(self.sequence, "prefix_tokens", 0)

    def items(self):
        return [(path, self.layers[_key(path)]) for path in self.paths]

    def export_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor under the exported format's keys (HF PEFT's where it has the method)."""
        state = self.sequence.export_state() if self.sequence is not None else {}
        for path, layer in self.items():
            state.update(layer.export_state(f"base_model.model.{path}"))
        return state

    def load_export_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.sequence is not None:
            self.sequence.load_export_state(state)
        for path, layer in self.items():
            layer.load_export_state(state, f"base_model.model.{path}")

    def dropout_mask(self, rows: int, seq: int, features: int, p: float, device, own_rows: bool = False) -> torch.Tensor:
        """Inverted-dropout mask for this task's rows. In the padded layout a row's length is the
        longest sequence of ANY task, so the mask is drawn at the task's own [rows, max_seq_len] shape
        and cut to the micro-batch's length: the mask a token gets does not depend on its neighbours.
        Chunk-aligned rows (`own_rows`) hold this task's tokens alone at a fixed chunk length: drawn as is."""
        if own_rows:
            mask = torch.empty((rows, seq, features), device=device)
            return mask.bernoulli_(1.0 - p, generator=self.dropout_gen).div_(1.0 - p)
        full = torch.empty((rows, self.max_seq_len, features), device=device)
        full.bernoulli_(1.0 - p, generator=self.dropout_gen).div_(1.0 - p)
        if seq <= self.max_seq_len:
            return full[:, :seq]
        pad = torch.ones((rows, seq - self.max_seq_len, features), device=device)
        return torch.cat([full, pad], dim=1)


def _key(path: str) -> str:
    return path.replace(".", "__")  # nn.ModuleDict keys may not contain dots


def _leaf_op_names(model: nn.Module) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    return {p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


class MultiplexedOp(nn.Module):
    """A frozen op shared by all tasks: base op once over all rows, then each task's adapter on its rows."""

    def __init__(self, base_op: nn.Module, mux: "Multiplexer", path: str):
        super().__init__()
        self.base_op = base_op
        self.path = path
        # plain attributes, not submodules: the backbone's state_dict stays the backbone's
        object.__setattr__(self, "_mux", mux)
        self.adapters: dict[str, nn.Module] = {}
        # what a grouped function keeps for all its tasks on this op, by its qualified name (the flat weight
        # stores of executor/flat_params.py)
        self.shared: dict[str, object] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        segments = self._mux.segments
        if not segments or not self.adapters:
            return self.base_op(x)
        # Backbones call an op on [rows, seq, features] or flattened [rows * seq, features] (OPT's MLP):
        # work on the flat token axis, where a segment of rows is a contiguous span of tokens.
        rows, seq = self._mux.shape
        if x.shape[:-1].numel() != rows * seq:
            raise RuntimeError(f"{self.path}: input has {x.shape[:-1].numel()} tokens, fused batch has {rows}x{seq}")
        spans = [(seg, seg.start * seq, seg.end * seq, self.adapters.get(seg.task)) for seg in segments]
        grouped = self._mux.backend(x.device) == "triton"

        # dispatch: a method that transforms the op's input (IA3 on feed-forward ops) does so on its
        # own rows; the frozen op then still runs ONCE over every task's rows.
        dispatching = [span for span in spans if hasattr(span[3], "dispatch")]
        if dispatching:
            flat_x = x.reshape(-1, x.shape[-1])
            kernel = _common_kernel(dispatching, "grouped_dispatch") if grouped else None
            if kernel is not None:
                dispatched = kernel([(layer, lo, hi) for _, lo, hi, layer in dispatching], flat_x, self._mux)
            else:
                # one split, not a slice per task: a slice's backward zero-fills a full-size dX
                runs = _runs(spans, lambda i, layer: hasattr(layer, "dispatch"))
                parts = flat_x.split([hi - lo for lo, hi, _ in runs])
                dispatched = torch.cat([part if span is None else span[3].dispatch(part.float()).to(x.dtype)
                                        for (*_, span), part in zip(runs, parts)], dim=0)
            out = self.base_op(dispatched.view(x.shape))
        else:
            # base op first, as HF PEFT does: autograd then sums dX's contributions in the same order
            out = self.base_op(x)
            flat_x = x.reshape(-1, x.shape[-1])
        flat_out = out.reshape(-1, out.shape[-1])

        # aggregate, grouped: one kernel launch (Triton) or one autograd node (torch: `looped_aggregate`)
        # for all segments of a method that has one
        done: set[int] = set()
        kernel_name = "grouped_aggregate" if grouped else "looped_aggregate"
        # the looped torch path computes in the adapters' fp32 only (low-precision backbones take the per-task path)
        if grouped or flat_x.dtype == flat_out.dtype == torch.float32:
            by_kernel: dict = {}
            for i, (_, _, _, layer) in enumerate(spans):
                kernel = getattr(layer, kernel_name, None)
                if kernel is not None:
                    by_kernel.setdefault(kernel, []).append(i)
            # the looped kernel adds in place into what it is given unless that is a view: a Linear's
            # [rows, seq, n] output is none, its flat reshape is (a copy of the op's whole output per call)
            current = flat_out if grouped else out
            for kernel, members in by_kernel.items():
                items = [(spans[i][3], spans[i][1], spans[i][2], self._dropout_mask(*spans[i], flat_x, flat_out))
                         for i in members]
                current = kernel(items, flat_x, current, self._mux)
                done.update(members)
            flat_out = current.reshape(-1, out.shape[-1])
            if all(i in done or layer is None for i, (*_, layer) in enumerate(spans)):
                return flat_out.view(out.shape)

        # aggregate, per task: each task combines the shared output with its adapter on its own rows.
        # Segments tile the rows in order (checked by `route`), so the result is a concatenation: no
        # in-place write into the base op's output.
        # One split (not a slice per task): its backward assembles dX once instead of zero-filling a
        # full-size gradient per task and summing them. Neighbouring rows that pass through unchanged
        # (no adapter here, or already aggregated above) stay one piece: a LoRA task beside a DoRA one
        # then adds no split/cat pieces (and their backward views) of its own.
        runs = _runs(spans, lambda i, layer: layer is not None and i not in done)
        sizes = [hi - lo for lo, hi, _ in runs]
        x_parts, out_parts = flat_x.split(sizes), flat_out.split(sizes)
        pieces = []
        for (*_, span), x_part, piece in zip(runs, x_parts, out_parts):
            if span is not None:
                mask = self._dropout_mask(*span, flat_x, flat_out)
                piece = span[3].aggregate(x_part.float(), piece.float(), mask).to(out.dtype)
            pieces.append(piece)
        return torch.cat(pieces, dim=0).view(out.shape)

    def _dropout_mask(self, seg: Segment, lo: int, hi: int, layer, flat_x, flat_out) -> torch.Tensor | None:
        """The task's dropout mask for its rows, [tokens, width], drawn at the task's own shape."""
        if getattr(layer, "dropout", 0.0) <= 0 or not self._mux.training:
            return None
        # most methods drop the op's input; a serial adapter drops its own input, the op's output
        width = flat_out.shape[-1] if getattr(layer, "dropout_on", "input") == "output" else flat_x.shape[-1]
        mask = self._mux.adapters[seg.task].dropout_mask(seg.end - seg.start, self._mux.shape[1], width,
                                                         layer.dropout, flat_x.device, self._mux.own_rows)
        return mask.reshape(-1, width)


def _runs(spans, active) -> list[list]:
    """The spans as [first row, end row, span or None]: a span where `active(index, layer)`, else None for
    a run of neighbouring spans whose rows pass through unchanged (merged into one piece)."""
    runs: list[list] = []
    for i, span in enumerate(spans):
        if active(i, span[3]):
            runs.append([span[1], span[2], span])
        elif runs and runs[-1][2] is None:
            runs[-1][1] = span[2]
        else:
            runs.append([span[1], span[2], None])
    return runs


def _common_kernel(spans, name: str):
    """The grouped kernel all these spans' layers share, or None (then the per-task path runs)."""
    kernels = {getattr(layer, name, None) for *_, layer in spans}
    return kernels.pop() if len(kernels) == 1 and None not in kernels else None


class Multiplexer:
    """Per-task adapters around one shared frozen backbone, and the routing of the batch in flight."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapters: dict[str, TaskAdapter] = {}
        self.segments: list[Segment] | None = None
        self.shape: tuple[int, int] = (0, 0)  # (rows, seq) of the fused micro-batch in flight
        self.training = True
        self.own_rows = False  # rows hold one task's tokens at a length independent of other tasks
        self.kernels: str | None = None  # None: $MUXTUNE_KERNELS (see muxtune.kernels)
        self._ops: dict[str, MultiplexedOp] = {}
        self._tables: dict = {}  # segment tables of the batch in flight, shared by every op and layer

    @classmethod
    def attach(cls, model: nn.Module) -> "Multiplexer":
        """The model's one multiplexer: created on first use, then reused, so a backbone's ops are
        wrapped once however many trainers come and go on it."""
        mux = getattr(model, "_muxtune_multiplexer", None)
        if mux is None:
            mux = cls(model)
            object.__setattr__(model, "_muxtune_multiplexer", mux)
        return mux

    def add_task(self, name: str, peft_config, seed: int, max_seq_len: int) -> TaskAdapter:
        if name in self.adapters:
            raise MuxTuneError(f"task {name!r} is already attached")
        # a pipeline stage keeps other stages' weights on the meta device: the first real one says where it is
        device = next((p.device for p in self.model.parameters() if not p.is_meta), torch.device("cpu"))
        adapter = TaskAdapter(name, peft_config, self.model, seed, max_seq_len, device)
        for path, layer in adapter.items():
            self._wrap(path).adapters[name] = layer
        self.adapters[name] = adapter
        return adapter

    def remove_task(self, name: str) -> TaskAdapter:
        adapter = self.adapters.pop(name)
        for path in adapter.paths:
            self._ops[path].adapters.pop(name, None)
        return adapter

    def op(self, path: str) -> MultiplexedOp:
        """The multiplexed op at `path` (a backbone op some task's adapter wraps)."""
        return self._ops[path]

    def _wrap(self, path: str) -> MultiplexedOp:
        if path not in self._ops:
            parent_path, _, attr = path.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            op = MultiplexedOp(getattr(parent, attr), self, path)
            setattr(parent, attr, op)
            self._ops[path] = op
        return self._ops[path]

    @contextlib.contextmanager
    def route(self, segments: list[Segment], seq: int, training: bool = True, own_rows: bool = False):
        """Within this block, backbone forwards apply each task's adapter to its segment of rows.
        own_rows: the row length is fixed (chunk-aligned layout), not set by the longest task."""
        expected = 0
        for seg in segments:
            if seg.start != expected or seg.end <= seg.start:
                raise ValueError(f"segments must tile the rows in order, got {segments}")
            expected = seg.end
        with self.restored_routing((segments, (expected, seq), training, own_rows, {})):
            yield

    def routing_state(self) -> tuple:
        """The routing of the batch in flight, for a block that runs its forward again later
        (executor/recompute.py)."""
        return self.segments, self.shape, self.training, self.own_rows, self._tables

    @contextlib.contextmanager
    def restored_routing(self, state: tuple):
        """Within this block the batch routed as `state` (routing_state) is in flight again."""
        previous = self.routing_state()
        self.segments, self.shape, self.training, self.own_rows, self._tables = state
        try:
            yield
        finally:
            self.segments, self.shape, self.training, self.own_rows, self._tables = previous

    def backend(self, device: torch.device) -> str:
        """'triton' or 'torch' for the batch in flight (resolved once per batch, not once per op call)."""
        from muxtune.kernels import backend

        return self.segment_table(("backend", device.type), lambda: backend(device, self.kernels))

    def segment_table(self, key, build):
        """Per-batch metadata (a grouped kernel's segment table, the kernel backend), built once per
        micro-batch for each distinct key."""
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = build()
        return table
