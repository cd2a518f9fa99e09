"""A PEFT method from outside MuxTune, for tests/test_extra_method.py: a learned gain per output channel of
each target op, y = W x * (1 + g), g starting at 0 (training starts from the frozen model). It reaches
MuxTune through the `muxtune.peft_methods` entry point, as another package's method would; nothing in the
project names it."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from muxtune.executor.backbone import op_features
from muxtune.method_card import FP32, MethodCard, kv_width

METHOD = "scaled"
SHAPE = "scaling"
CARD = MethodCard(
    METHOD, "scaled", SHAPE,
    params=lambda s, r: s.n_layers * (s.hidden + kv_width(s)),  # q_proj and v_proj outputs
    analytic=lambda h, r: (2, h, FP32 * 3 * h, 3),
    probe=lambda r, targets: {"method": METHOD, "target_modules": targets},
    probe_ranks=(0,))


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["scaled"] = "scaled"
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)


class Gain(nn.Module):
    def __init__(self, out_features: int):
        super().__init__()
        self.gain = nn.Parameter(torch.zeros(out_features))

    def aggregate(self, x: torch.Tensor, out: torch.Tensor, dropout_mask: torch.Tensor | None) -> torch.Tensor:
        return out * (1 + self.gain)

    def export_state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.gain": self.gain}

    def load_export_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        with torch.no_grad():
            self.gain.copy_(state[f"{prefix}.gain"])


def build_layer(config: Config, base_op: nn.Module, path: str, generator: torch.Generator) -> Gain:
    return Gain(op_features(base_op)[1])


def hf_config(config: Config, base_model_name: str, fan_in_fan_out: bool):
    return None  # HF PEFT has no such method: exported in MuxTune's own format
