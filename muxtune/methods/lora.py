"""LoRA: its card and its config, the torch-free half of the method (the layer:
executor/peft/lora.py). `muxtune.spec` reads these without importing torch."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from muxtune.method_card import FP32, MethodCard, kv_width

METHOD = "lora"
SHAPE = "parallel"
CARD = MethodCard(
    METHOD, "LoRA", SHAPE,
    params=lambda s, r: s.n_layers * (r * (s.hidden + s.hidden) + r * (s.hidden + kv_width(s))),  # q_proj, v_proj
    analytic=lambda h, r: (2, 4 * h * r, FP32 * 4 * h, 6),
    probe=lambda r, targets: {"method": METHOD, "r": r, "target_modules": targets},
    targeted=True, tensor_parallel=True)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, le=4096)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
