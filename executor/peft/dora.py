"""DoRA (Liu et al. 2024): weight-decomposed LoRA. The op's weight is split into a direction and a
trainable per-output magnitude m; LoRA updates the direction:

    W' = m * (W + s B A) / ||W + s B A||_row      (the norm detached from the graph, paper section 4.3)

Shape "parallel", like LoRA: the frozen op runs once over every task's rows, and each task rescales its
own rows of the shared output. With k = m / ||W + s B A|| (one factor per output feature):

    y = base(x) + (k - 1) * (base(x) - bias) + k * s * B A x

This is HF PEFT 0.21.2's `DoraLinearLayer.forward` (peft/tuners/lora/dora.py) term for term and in the
same order, so a task trains bit-identically to `LoraConfig(use_dora=True)` run alone. The LoRA half
(A, B, init, scaling, dropout, export keys) is lora.py's `LoraLayer`; this file adds the magnitude.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from muxtune.executor.backbone import op_features
from muxtune.executor.flat_params import StoreRows
from muxtune.executor.peft import lora
from muxtune.methods.dora import CARD, METHOD, SHAPE, Config  # noqa: F401  (its torch-free half)


class Magnitude(nn.Module):
    """m, held in a submodule as peft holds it (`lora_magnitude_vector.<adapter>.weight`), not as a bare
    Parameter of DoraLayer: nn.Module lists a module's own parameters before its children's, and a
    task's gradient clipping sums per-tensor norms in parameter order. peft's order (A, B, m) keeps the
    clipped gradients, hence the trained weights, bit-identical."""

    def __init__(self, weight_norm: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight_norm)


# the weights a DoRA task's layer keeps in its op's flat store (A and B first, as the LoRA kernel reads them)
WEIGHTS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector.weight")


class DoraLayer(lora.LoraLayer):
    """One task's DoRA on one frozen op: LoRA's A and B, plus the magnitude vector m over out_features."""

    def __init__(self, config: Config, base_op: nn.Module, generator: torch.Generator):
        super().__init__(config, *op_features(base_op), generator)
        # The frozen op's weight enters the norm, so the layer needs the op. A plain attribute, not a
        # submodule: the backbone's weights must stay out of this adapter's parameters, state_dict and
        # `.to(dtype=float32)` (which would otherwise cast a bf16 backbone in place).
        object.__setattr__(self, "base_op", base_op)
        # transformers' Conv1D (GPT-2) stores its weight as [in, out]; HF PEFT's `fan_in_fan_out`
        self.fan_in_fan_out = isinstance(base_op, Conv1D)
        # HF PEFT's init: m = ||W + s B A|| row-wise, so the adapter starts as the identity (B = 0).
        with torch.no_grad():
            weight = self.op_weight(torch.float32)
            # the layer is built on the CPU (the task's init generator), the op may sit on a GPU
            lora_weight = (self.lora_B.weight @ self.lora_A.weight).to(weight.device)
            weight_norm = self.weight_norm(weight, lora_weight)
        self.lora_magnitude_vector = Magnitude(weight_norm)

    # LoRA's looped CPU path computes a plain low-rank update; DoRA's per-task path stays the CPU's (it is
    # HF PEFT's term for term, bit-identical); its grouped (Triton) path is below
    looped_aggregate = None

    @staticmethod
    def grouped_aggregate(items, flat_x: torch.Tensor, flat_out: torch.Tensor, mux) -> torch.Tensor:
        """All DoRA segments of one op with a launch count independent of the number of tenants: the
        low-rank updates s B A x by LoRA's grouped kernel over the op's flat store of DoRA tasks' A and
        B, every task's row norms ||W + s B A|| batched from that store without an [n, k] matrix per task
        (||W_i||^2 + 2s B_i (A W_i) + s^2 B_i (A A^T) B_i^T, the tasks' A and B padded to the largest
        rank by one gather each), the magnitudes gathered from the same store, and each row's k = m / norm
        picked by its segment:  y = out + (k - 1) W x + k s B A x  (W x = out - bias, or W x_dropped under dropout).
        The function of `aggregate`; rounding differs (the expanded norm), as the kernel's does.
        Returns a new [tokens, n] output; rows of other tasks keep their values exactly (k = 1 there)."""
        layers = [layer for layer, *_ in items]
        out = flat_out.float()
        delta, x, store, table = lora.grouped_update(items, flat_x, torch.zeros_like(out), mux,
                                                     DoraLayer.grouped_aggregate, WEIGHTS)
        weight = layers[0].op_weight(torch.float32)  # [n, k]: one op, all tasks
        (n, k), tasks = weight.shape, len(layers)
        ranks = tuple(layer.lora_A.weight.shape[0] for layer in layers)
        offsets = tuple(store.offsets[id(layer)] for layer in layers)
        a_index, b_index, m_index = mux.segment_table(("dora padding", offsets, ranks, k, n), lambda: _padding_index(
            offsets, ranks, k, n, store.data.numel(), weight.device))
        flat = torch.cat([store.data.detach(), store.data.new_zeros(1)])  # the last element: padding's zero
        a, b = flat[a_index], flat[b_index]  # [T, r_max, k], [T, n, r_max]
        scale = table.scale.view(tasks, 1)
        cross = (b * (a.reshape(-1, k) @ weight.T).view(tasks, -1, n).transpose(1, 2)).sum(-1)  # B_i . (A W_i)
        quad = ((b @ (a @ a.transpose(1, 2))) * b).sum(-1)  # B_i (A A^T) B_i^T
        norm = ((weight * weight).sum(1) + 2 * scale * cross + scale * scale * quad).clamp_min(0).sqrt()
        magnitudes = StoreRows.apply(store.data, m_index, lambda write: store.accumulate(layers, write))
        factor = magnitudes / norm  # [T, n]
        # row factors: one leading row of ones for the rows of no DoRA segment (token_segment -1)
        rows = torch.cat([factor.new_ones(1, n), factor])[table.token_segment.long() + 1]
        if x is flat_x:  # no dropout: W x is the shared output without its bias
            bias = getattr(layers[0].base_op, "bias", None)
            base = out if bias is None else out - bias.float()
        else:
            base = F.linear(x.float(), weight)
        return (out + ((rows - 1) * base + rows * delta)).to(flat_out.dtype)

    def op_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The frozen op's weight as [out, in] (a view for Conv1D, as peft's `transpose`)."""
        weight = self.base_op.weight.to(dtype)
        return weight.T if self.fan_in_fan_out else weight

    def weight_norm(self, weight: torch.Tensor, lora_weight: torch.Tensor) -> torch.Tensor:
        """||W + s ΔW|| over each output feature's row (peft's `get_weight_norm`, same op order)."""
        weight = weight + self.scaling * lora_weight
        return torch.linalg.norm(weight, dim=1).to(weight.dtype)

    def aggregate(self, x: torch.Tensor, out: torch.Tensor, dropout_mask: torch.Tensor | None) -> torch.Tensor:
        """This task's rows of the op's input `x` and shared output `out` -> its rows of the new output."""
        # ΔW = B A computed as peft does, through the layers on an identity matrix (it avoids `B.weight @
        # A.weight` for FSDP); same kernels, same rounding. It enters only the detached norm.
        eye = torch.eye(self.lora_A.weight.shape[1], device=x.device, dtype=self.lora_A.weight.dtype)
        lora_weight = self.lora_B(self.lora_A(eye)).T.to(x.dtype)
        weight = self.op_weight(x.dtype)
        # The norm is a constant for backprop (DoRA paper, section 4.3): only m and the LoRA path train.
        weight_norm = self.weight_norm(weight, lora_weight.detach()).detach()
        mag_norm_scale = (self.lora_magnitude_vector.weight / weight_norm).view(1, -1)

        if dropout_mask is None:
            base_result = out  # no dropout (or eval): reuse the shared op's output
        else:
            # Dropout on: peft feeds the DROPPED input to both the LoRA path and the rescaled W x, so
            # W x must be recomputed on this task's rows (the shared output saw the undropped x).
            x = x * dropout_mask
            base_result = None

        lora_result = self.lora_B(self.lora_A(x))

        if base_result is not None:
            # The bias is not part of the direction: only W x is rescaled, y = base(x) + (k - 1) W x + ...
            bias = getattr(self.base_op, "bias", None)
            if bias is not None:
                base_result = base_result - bias
        else:
            base_result = F.linear(x, weight)

        result_dora = (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * self.scaling
        return out + result_dora

    def export_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """lora_A/lora_B as LoRA, plus the magnitude under peft's saved key (no `.weight` suffix)."""
        return {**super().export_state(prefix), f"{prefix}.lora_magnitude_vector": self.lora_magnitude_vector.weight}

    def load_export_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        super().load_export_state(state, prefix)
        with torch.no_grad():
            self.lora_magnitude_vector.weight.copy_(state[f"{prefix}.lora_magnitude_vector"])


def _padding_index(offsets: tuple, ranks: tuple, k: int, n: int, pad: int, device) -> tuple[torch.Tensor, ...]:
    """Indices into a DoRA store (with a zero appended at `pad`) that gather every segment's A [r, k] and
    B [n, r] padded to the largest rank, and its magnitude: [T, r_max, k], [T, n, r_max] and [T, n]. Built
    by a few device ops over all segments at once (once per micro-batch and op shape, cached by the
    Multiplexer)."""
    r_max = max(ranks)
    rank = torch.tensor(ranks, device=device).view(-1, 1, 1)
    a_off, b_off, m_off = torch.tensor(offsets, device=device).T.reshape(3, -1, 1, 1)
    i = torch.arange(r_max, device=device).view(1, -1, 1)  # A's row
    a_index = torch.where(i < rank, a_off + i * k + torch.arange(k, device=device).view(1, 1, -1), pad)
    j = torch.arange(r_max, device=device).view(1, 1, -1)  # B's column
    b_index = torch.where(j < rank, b_off + torch.arange(n, device=device).view(1, -1, 1) * rank + j, pad)
    return a_index, b_index, m_off.view(-1, 1) + torch.arange(n, device=device)


def build_layer(config: Config, base_op: nn.Module, path: str, generator: torch.Generator) -> DoraLayer:
    layer = DoraLayer(config, base_op, generator)
    layer.path = path  # the grouped path finds the op's flat store through it
    return layer


def hf_config(config: Config, base_model_name: str, fan_in_fan_out: bool):
    # LoRA's config with use_dora; `replace` re-runs LoraConfig's own checks for the combination
    return dataclasses.replace(lora.hf_config(config, base_model_name, fan_in_fan_out), use_dora=True)
