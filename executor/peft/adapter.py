"""Bottleneck adapter (Houlsby et al. 2019): after a frozen op, h + up(act(down(h))).

Shape "serial": the frozen op runs first (once, over every task's rows); its output h is this task's
adapter input, and the new output is h plus the adapter's bottleneck transform of h. Placed after the
attention output projection and/or the feed-forward output projection, as in Houlsby's design. HF PEFT
has no such method, so export writes MuxTune's own format (see executor/export.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from muxtune.errors import MuxTuneError
from muxtune.executor.backbone import op_features
from muxtune.methods.adapter import CARD, METHOD, SHAPE, Config  # noqa: F401  (its torch-free half)
from muxtune.schedule import FAMILIES

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class AdapterLayer(nn.Module):
    """One task's bottleneck adapter after one frozen op whose output has `features` columns."""

    def __init__(self, config: Config, features: int, generator: torch.Generator):
        super().__init__()
        self.adapter_down = nn.Linear(features, config.size)
        self.adapter_up = nn.Linear(config.size, features)
        self.act = ACTIVATIONS[config.activation]()
        # Down projection as nn.Linear's own default (kaiming-uniform), but drawn from the task's
        # generator so the init depends on the task's seed alone. Zero biases and a zero up projection
        # make the adapter the identity at init (Houlsby; AdapterHub): training starts from the backbone.
        nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.dropout = config.dropout
        self.dropout_on = "output"  # the mask covers this adapter's input: the op's output

    def aggregate(self, x: torch.Tensor, out: torch.Tensor, dropout_mask: torch.Tensor | None) -> torch.Tensor:
        """The op's input `x` is not used: a serial adapter sees only the op's output `out` (= h)."""
        h = out * dropout_mask if dropout_mask is not None else out
        return out + self.adapter_up(self.act(self.adapter_down(h)))

    def export_state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{name}": p for name, p in self.named_parameters()}

    def load_export_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(state[f"{prefix}.{name}"])


def build_layer(config: Config, base_op: nn.Module, path: str, generator: torch.Generator) -> AdapterLayer:
    _, out_features = op_features(base_op)
    return AdapterLayer(config, out_features, generator)


def resolve(config: Config, model: nn.Module) -> Config:
    """`placement` -> op names for this model family, unless the task named its ops itself."""
    if config.target_modules is not None:
        return config
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    # where `placement` puts the adapter in each model family (muxtune/schedule.py's family table)
    if model_type not in FAMILIES:
        raise MuxTuneError(
            f"peft.placement: no known attention/ffn output ops for model type {model_type!r} "
            f"(known: {', '.join(sorted(FAMILIES))}); set peft.target_modules to the op names instead")
    ops = FAMILIES[model_type].placement
    targets = list(dict.fromkeys(ops[place] for place in config.placement))  # unique, in placement order
    return config.model_copy(update={"target_modules": targets})


def hf_config(config: Config, base_model_name: str, fan_in_fan_out: bool):
    return None  # HF PEFT has no bottleneck adapter: export writes MuxTune's format
