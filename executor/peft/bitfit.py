"""BitFit (Ben Zaken et al. 2021): only the biases of the backbone's ops train.

Shape "bias": the frozen op runs once over every task's rows with its own (frozen) bias; each task then
swaps that bias for its own on its rows: out - frozen_bias + task_bias. The shared op is never touched,
so any number of tasks can hold different biases for it. An op without a bias (LLaMA's) gains one,
initialised to zero. HF PEFT has no such method, so export writes MuxTune's own format.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from muxtune.errors import MuxTuneError
from muxtune.executor.backbone import op_features
from muxtune.methods.bitfit import CARD, METHOD, SHAPE, Config  # noqa: F401  (its torch-free half)


class BitFitLayer(nn.Module):
    """One task's bias for one frozen op."""

    def __init__(self, base_op: nn.Module):
        super().__init__()
        _, out_features = op_features(base_op)
        frozen = base_op.bias
        frozen = torch.zeros(out_features) if frozen is None else frozen.detach().clone()
        # The task's bias starts as the frozen one; the frozen copy is a buffer, not a parameter (and
        # not persistent: it belongs to the backbone, not to the task's state).
        self.bias = nn.Parameter(frozen.clone())
        self.register_buffer("frozen_bias", frozen, persistent=False)

    def aggregate(self, x: torch.Tensor, out: torch.Tensor, dropout_mask: torch.Tensor | None) -> torch.Tensor:
        # Adding the difference (rather than out - frozen + bias) leaves the output bit-identical to
        # the frozen op's while the task's bias is still the frozen one.
        return out + (self.bias - self.frozen_bias)

    def export_state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.bias": self.bias}  # the task's full bias, not the difference

    def load_export_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        with torch.no_grad():
            self.bias.copy_(state[f"{prefix}.bias"])


def build_layer(config: Config, base_op: nn.Module, path: str, generator: torch.Generator) -> BitFitLayer:
    return BitFitLayer(base_op)  # nothing random: the init is the backbone's own bias


def resolve(config: Config, model: nn.Module) -> Config:
    """Default targets: every Linear/Conv1D op inside a transformer block, named by its path within the
    block (e.g. `self_attn.q_proj`, `mlp.c_fc`), so the LM head and any embedding projections stay out."""
    if config.target_modules is not None:
        return config
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = []
    for path, module in model.named_modules():
        op = getattr(module, "base_op", module)  # an op another task already multiplexed
        if not isinstance(op, (nn.Linear, Conv1D)) or op is head or path.endswith(".base_op"):
            continue
        parts = path.split(".")
        # the first numeric part is the block index (model.layers.<i>, transformer.h.<i>, ...)
        block = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if block is not None and block + 1 < len(parts):
            targets.append(".".join(parts[block + 1 :]))
    if not targets:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise MuxTuneError(f"peft.target_modules: found no Linear/Conv1D op inside the transformer blocks of "
                           f"this {model_type!r} model; set peft.target_modules to the op names")
    return config.model_copy(update={"target_modules": list(dict.fromkeys(targets))})


def hf_config(config: Config, base_model_name: str, fan_in_fan_out: bool):
    return None  # HF PEFT has no BitFit: export writes MuxTune's format
