"""Tensor parallelism (Megatron-LM style) of the frozen backbone, each task's LoRA split to match.

The `tp` processes of one (replica, stage) split every decoder layer's projections:

  column-parallel  q/k/v_proj, gate/up_proj   weight rows (output features) split: each process computes
                                              its heads / its slice of the MLP width from the full input
  row-parallel     o_proj, down_proj          weight columns (input features) split: each process turns its
                                              heads / MLP slice into a partial sum of the full output,
                                              and one all-reduce adds the partial sums

Attention needs no change: the HF LLaMA attention reshapes with -1 heads, so a process simply runs its
`heads / tp` query heads and `kv_heads / tp` key/value heads. Embeddings, norms and the LM head are
replicated. Collectives, as Megatron's f and g operators:
  column op input   identity forward, all-reduce of dX backward (each process only sees its columns' dX)
  row op output     all-reduce forward, identity backward (every process holds the full output gradient)

A task's LoRA (y = W x + s B A x) is split with its op:
  column op   A replicated (it reads the full input), B split by output rows like W;
              A's gradient is a partial sum on each process (B_t^T dY_t) -> all-reduced after the backward
  row op      A split by input columns like W, B replicated; s B (A_t x_t) is a partial sum of the
              adapter's output, added to W_t x_t BEFORE the op's one all-reduce (one collective per op,
              not two); B's gradient s dY (A_t x_t)^T is a partial sum -> all-reduced after the backward
Adapters on ops that are not split (replicated) train identically on every process: nothing to reduce.
A row op's LoRA dropout mask is drawn at the full input width from the task's dropout stream (the same
on every process) and cut to this process's columns: the same mask as one process.

Why explicit collectives and not `torch.distributed.tensor.parallel.parallelize_module`: its
RowwiseParallel all-reduces the base op's output inside the op, before a task's adapter term could be
added, so a row-parallel LoRA would need a second all-reduce; and the multiplexed ops add each task's
adapter to its own rows of a plain tensor output. (parallelize_module itself runs on gloo/CPU.)

Only LoRA is supported under TP; other methods are refused with the task and method named.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from muxtune.errors import MuxTuneError
from muxtune.executor.mux import MultiplexedOp
from muxtune.schedule import TENSOR_PARALLEL_FAMILIES, TP_COLUMN_OPS, TP_LAYERS, TP_ROW_OPS

# the model families whose decoder layers (at LAYERS) use these projection names (the HF LLaMA layout)
FAMILIES, LAYERS, COLUMN_OPS, ROW_OPS = TENSOR_PARALLEL_FAMILIES, TP_LAYERS, TP_COLUMN_OPS, TP_ROW_OPS


class _CopyToGroup(torch.autograd.Function):
    """Megatron's f: the input is replicated; the input's gradient is the sum over the group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """Megatron's g: partial sums are added over the group; the gradient is already replicated."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ShardedLinear(nn.Module):
    """This process's slice of a frozen nn.Linear (no bias: a row op adds it after the reduction)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallel(nn.Module):
    """A column-parallel op (with its tasks' adapters when multiplexed): full input -> this slice's output."""

    def __init__(self, op: nn.Module, group):
        super().__init__()
        self.op, self.group = op, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(_CopyToGroup.apply(x, self.group))


class RowParallel(nn.Module):
    """A row-parallel op: this slice's input -> partial sums (base op + adapters), reduced once, + bias."""

    def __init__(self, op: nn.Module, bias: torch.Tensor | None, group):
        super().__init__()
        self.op, self.group = op, group
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _ReduceFromGroup.apply(self.op(x), self.group)
        return out if self.bias is None else out + self.bias


class RowShardedLora(nn.Module):
    """A task's LoRA on a row-parallel op: its own A columns, the full B. Stands in for the task's
    LoraLayer in the op (same parameters); draws the dropout mask at the full input width and keeps
    this process's columns, so every process and one process see the same mask."""

    dropout = 0.0  # the multiplexed op draws no mask for this layer: it draws its own below

    def __init__(self, layer: nn.Module, task_adapter, mux, columns: slice, full_width: int):
        super().__init__()
        self.layer = layer
        self.columns, self.full_width = columns, full_width
        object.__setattr__(self, "_task", task_adapter)  # not submodules: no double registration
        object.__setattr__(self, "_mux", mux)

    def aggregate(self, x: torch.Tensor, out: torch.Tensor, dropout_mask: torch.Tensor | None) -> torch.Tensor:
        mask = None
        if self.layer.dropout > 0 and self._mux.training:
            seq = self._mux.shape[1]
            mask = self._task.dropout_mask(x.shape[0] // seq, seq, self.full_width, self.layer.dropout, x.device,
                                           self._mux.own_rows).reshape(-1, self.full_width)[:, self.columns]
        return self.layer.aggregate(x, out, mask)


def check_supported(model: nn.Module, runs: dict, tp: int) -> None:
    """Refuse what this split does not cover, naming the model setting or the task."""
    config = model.config
    if config.model_type not in FAMILIES:
        raise MuxTuneError(f"plan: tensor parallelism is implemented for {list(FAMILIES)} models, not "
                           f"model type {config.model_type!r}")
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    for what, n in (("num_attention_heads", config.num_attention_heads), ("num_key_value_heads", kv_heads),
                    ("intermediate_size", config.intermediate_size)):
        if n % tp:
            raise MuxTuneError(f"plan: layout.tp={tp} does not divide the model's {what}={n}")
    for name, run in runs.items():
        method = run.spec.peft.method
        if method != "lora":
            raise MuxTuneError(f"plan: task {name!r}: method {method!r} is not supported under tensor parallelism "
                               f"(tp={tp}); only LoRA is. Use tp=1 for this task's plan")


def op_kind(path: str) -> str | None:
    """'column', 'row' or None (replicated) for a decoder-layer op path."""
    leaf = path.rsplit(".", 1)[-1]
    return "column" if leaf in COLUMN_OPS else "row" if leaf in ROW_OPS else None


def _slice(n: int, tp: int, rank: int) -> slice:
    size = n // tp
    return slice(rank * size, (rank + 1) * size)


class TensorParallel:
    """The split of one process (tensor rank `rank` of `tp`) of a stage: backbone slices, adapter
    slices, and which adapter tensors are replicated (their gradients are summed over the group)."""

    def __init__(self, model: nn.Module, mux, runs: dict, layers: range, tp: int, rank: int, group):
        check_supported(model, runs, tp)
        self.tp, self.rank, self.group = tp, rank, group
        self.replicated: dict[str, list[nn.Parameter]] = {name: [] for name in runs}  # partial grads, summed
        self.split_dims: dict[str, dict[str, int]] = {name: {} for name in runs}  # export key -> concat dim
        self.counted_once: set[int] = set()  # ids of parameters identical on every process (norm: once)
        prefix = LAYERS + "."
        full_layers = model.get_submodule(LAYERS)
        for index in layers:
            for path, module in list(full_layers[index].named_modules()):
                kind = op_kind(path)
                if kind is not None and isinstance(module, (nn.Linear, MultiplexedOp)):
                    self._split_op(full_layers[index], path, f"{prefix}{index}.{path}", kind, mux, runs)
        for name, run in runs.items():  # adapters of replicated ops and every A/B left whole: norm once
            split = {id(p) for p in self._split_parameters(name, run)}
            self.counted_once.update(id(p) for p in run.parameters() if id(p) not in split)

    def _split_parameters(self, name, run):
        keys = self.split_dims[name]
        return [p for key, p in run.adapter.export_state().items() if key in keys]

    def _split_op(self, layer: nn.Module, local: str, path: str, kind: str, mux, runs: dict) -> None:
        op = layer.get_submodule(local)
        base = op.base_op if isinstance(op, MultiplexedOp) else op
        out_features, in_features = base.weight.shape
        rows = _slice(out_features, self.tp, self.rank) if kind == "column" else slice(None)
        cols = _slice(in_features, self.tp, self.rank) if kind == "row" else slice(None)
        bias = base.bias.detach() if base.bias is not None else None
        shard = ShardedLinear(base.weight.detach()[rows, cols].clone(),
                              bias[rows].clone() if kind == "column" and bias is not None else None)
        if isinstance(op, MultiplexedOp):
            op.base_op = shard
            for name, lora in list(op.adapters.items()):
                self._split_lora(name, runs[name], op, lora, path, kind, rows, cols, in_features, mux)
        else:
            op = shard
        wrapped = ColumnParallel(op, self.group) if kind == "column" else RowParallel(op, bias, self.group)
        parent, _, attr = local.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, attr, wrapped)

    def _split_lora(self, name, run, op, lora, path, kind, rows, cols, in_features, mux) -> None:
        key = f"base_model.model.{path}"
        with torch.no_grad():  # .data: the optimizer already holds these Parameter objects
            if kind == "column":
                lora.lora_B.weight.data = lora.lora_B.weight.data[rows].clone()
                self.replicated[name].append(lora.lora_A.weight)
                self.split_dims[name][f"{key}.lora_B.weight"] = 0
            else:
                lora.lora_A.weight.data = lora.lora_A.weight.data[:, cols].clone()
                self.replicated[name].append(lora.lora_B.weight)
                self.split_dims[name][f"{key}.lora_A.weight"] = 1
                op.adapters[name] = RowShardedLora(lora, run.adapter, mux, cols, in_features)

    def reduce_replicated_grads(self, runs) -> None:
        """Sum the partial gradients of replicated adapter tensors over the group (one buffer per task)."""
        for run in runs:
            params = self.replicated[run.spec.name]
            if not params:
                continue
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat, group=self.group)
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def make_whole(self, run, state: dict[str, torch.Tensor]) -> None:
        """Give the task's split tensors the full shapes of `state` (assembled from every rank), so the
        whole adapter can be loaded and exported here after training."""
        for key, p in run.adapter.export_state().items():
            if key in state and p.shape != state[key].shape:
                p.data = torch.empty(state[key].shape, dtype=p.dtype, device=p.device)

    def norm_share(self, p: nn.Parameter) -> bool:
        """Whether this process adds p's squared gradient to the task's clipping norm: a split tensor on
        every process (each holds a different slice), a replicated one on tensor rank 0 only."""
        return id(p) not in self.counted_once or self.rank == 0


def assemble_state(parts: list[tuple[dict, dict]]) -> dict[str, torch.Tensor]:
    """One stage's full adapter state from its tensor ranks' (state, split dims), in tensor-rank order:
    split tensors are concatenated, replicated ones taken from tensor rank 0."""
    state, pieces = {}, {}
    for part, dims in parts:
        for key, value in part.items():
            if key in dims:
                pieces.setdefault(key, []).append(value)
            else:
                state.setdefault(key, value)
    dims = parts[0][1]
    state.update({key: torch.cat(values, dim=dims[key]) for key, values in pieces.items()})
    return state
