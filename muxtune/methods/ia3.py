"""(IA)^3: its card and its config, the torch-free half of the method (the layer:
executor/peft/ia3.py). `muxtune.spec` reads these without importing torch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from muxtune.method_card import FP32, MethodCard, kv_width

METHOD = "ia3"
SHAPE = "scaling"
CARD = MethodCard(
    METHOD, "IA3", SHAPE,
    params=lambda s, r: s.n_layers * (2 * kv_width(s) + s.intermediate),  # k, v outputs and down's input
    analytic=lambda h, r: (3, h, FP32 * 3 * h, 3),
    probe=lambda r, targets: {"method": METHOD})


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["ia3"] = "ia3"
    # None: HF PEFT's defaults for the backbone's model type, filled in by `resolve`
    target_modules: list[str] | None = Field(None, min_length=1)
    feedforward_modules: list[str] | None = None

    @model_validator(mode="after")
    def _feedforward_among_targets(self) -> "Config":
        # HF PEFT's IA3Config refuses this too (and could not reload such an adapter)
        if self.target_modules is not None and self.feedforward_modules is not None:
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(f"feedforward_modules {extra} are not in target_modules {self.target_modules}")
        return self
