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

    # LoRA's grouped paths compute a plain low-rank update; DoRA's rescaling needs its own (per-task) path
    grouped_aggregate = None
    looped_aggregate = None

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


def build_layer(config: Config, base_op: nn.Module, path: str, generator: torch.Generator) -> DoraLayer:
    return DoraLayer(config, base_op, generator)


def hf_config(config: Config, base_model_name: str, fan_in_fan_out: bool):
    # LoRA's config with use_dora; `replace` re-runs LoraConfig's own checks for the combination
    return dataclasses.replace(lora.hf_config(config, base_model_name, fan_in_fan_out), use_dora=True)
