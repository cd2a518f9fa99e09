"""LoRA (Hu et al. 2021): a frozen op W gains a trainable low-rank update, y = W x + s * B A dropout(x).

Shape "parallel": the op's input is dispatched to both the base op and the adapter, their outputs summed.
Parameter names, init and scaling follow HF PEFT's `LoraLayer` so exported weights load there as is.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from muxtune.executor.backbone import op_features
from muxtune.executor.flat_params import FlatParameters, flat_parameters
from muxtune.kernels.segments import SegmentTable, build_segment_table
from muxtune.methods.lora import CARD, METHOD, SHAPE, Config  # noqa: F401  (its torch-free half)


class LoraLayer(nn.Module):
    """One task's LoRA on one frozen op. `forward` returns the update to add to the op's output."""

    def __init__(self, config: Config, in_features: int, out_features: int, generator: torch.Generator):
        super().__init__()
        self.lora_A = nn.Linear(in_features, config.r, bias=False)
        self.lora_B = nn.Linear(config.r, out_features, bias=False)
        # Same init as HF PEFT (kaiming-uniform A, zero B), but drawn from the task's own generator so
        # the initial adapter depends on the task's seed alone, not on what else was built before it.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = config.scaling
        self.dropout = config.dropout

    def aggregate(self, x: torch.Tensor, out: torch.Tensor, dropout_mask: torch.Tensor | None) -> torch.Tensor:
        """This task's rows of the op's input `x` and shared output `out` -> its rows of the new output."""
        if dropout_mask is not None:
            x = x * dropout_mask
        return out + self.lora_B(self.lora_A(x)) * self.scaling

    @staticmethod
    def grouped_aggregate(items, flat_x: torch.Tensor, flat_out: torch.Tensor, mux) -> torch.Tensor:
        """All LoRA segments of one op in one Triton launch per GEMM (muxtune.kernels.lora). items: (layer,
        first row, end row, dropout mask or None) per segment; updates flat_out in place."""
        return grouped_update(items, flat_x, flat_out, mux, LoraLayer.grouped_aggregate)[0]

    @staticmethod
    def looped_aggregate(items, flat_x: torch.Tensor, flat_out: torch.Tensor, mux) -> torch.Tensor:
        """The torch path of `grouped_aggregate` (CPU): all LoRA segments of one op in one autograd node,
        one matmul pair per segment (muxtune.kernels.lora.looped_lora); bit-identical to HF PEFT."""
        from muxtune.kernels.lora import looped_lora

        return looped_lora(flat_x, flat_out, [(lo, hi) for _, lo, hi, _ in items],
                           [layer.scaling for layer, *_ in items], [mask for *_, mask in items],
                           [layer.lora_A.weight for layer, *_ in items], [layer.lora_B.weight for layer, *_ in items])

    def export_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """Weights under HF PEFT's keys (`<prefix>.lora_A.weight`), as PeftModel.from_pretrained expects."""
        return {f"{prefix}.lora_A.weight": self.lora_A.weight, f"{prefix}.lora_B.weight": self.lora_B.weight}

    def load_export_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        with torch.no_grad():
            self.lora_A.weight.copy_(state[f"{prefix}.lora_A.weight"])
            self.lora_B.weight.copy_(state[f"{prefix}.lora_B.weight"])


def grouped_update(items, flat_x: torch.Tensor, out: torch.Tensor, mux, kind,
                   names: tuple[str, ...] = ("lora_A.weight", "lora_B.weight")
                   ) -> tuple[torch.Tensor, torch.Tensor, FlatParameters, SegmentTable]:
    """`out` (flat [tokens, n]) with every segment's s B A x added to its rows, in place, by the grouped kernel,
    over the op's flat store of the weights `names` (A and B first) of every task whose layer's
    `grouped_aggregate` is `kind` (executor/flat_params.py: the host work per call does not grow with the
    tenants).
    Returns (out, the input the adapters read: dropped out where a task uses dropout, the store, the
    segment table: each segment's rows, rank, scale and weight offsets in the store)."""
    from muxtune.kernels.lora import SegmentedLoRA

    x = flat_x
    if any(mask is not None for *_, mask in items):
        pieces, cursor = [], 0
        for _, lo, hi, mask in items:
            pieces += [flat_x[cursor:lo], flat_x[lo:hi] if mask is None else flat_x[lo:hi] * mask]
            cursor = hi
        x = torch.cat(pieces + [flat_x[cursor:]])
    store = flat_parameters(mux, items[0][0], kind, names)
    layers = [layer for layer, *_ in items]
    k, n = flat_x.shape[-1], out.shape[-1]
    spans = tuple((lo, hi) for _, lo, hi, _ in items)
    ranks = tuple(layer.lora_A.weight.shape[0] for layer in layers)
    scales = tuple(layer.scaling for layer in layers)
    offsets = tuple(store.offsets[id(layer)][:2] for layer in layers)
    table = mux.segment_table((kind, spans, ranks, scales, offsets, k, n), lambda: build_segment_table(
        list(spans), list(ranks), [], [], list(scales), flat_x.shape[0], flat_x.device,
        offsets=([a for a, _ in offsets], [b for _, b in offsets])))
    out = SegmentedLoRA.apply(out, x, store.data, store.data, table, lambda write: store.accumulate(layers, write))
    return out, x, store, table


def build_layer(config: Config, base_op: nn.Module, path: str, generator: torch.Generator) -> LoraLayer:
    layer = LoraLayer(config, *op_features(base_op), generator)
    layer.path = path  # the grouped path finds the op's flat store through it
    return layer


def hf_config(config: Config, base_model_name: str, fan_in_fan_out: bool):
    from peft import LoraConfig

    return LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        use_rslora=config.use_rslora,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name,
    )
