"""The bottleneck adapter: its card and its config, the torch-free half of the method (the layer:
executor/peft/adapter.py). `muxtune.spec` reads these without importing torch."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from muxtune.method_card import FP32, MethodCard

METHOD = "adapter"
SHAPE = "serial"
CARD = MethodCard(
    METHOD, "adapter", SHAPE,
    params=lambda s, r: s.n_layers * 2 * (2 * s.hidden * r + r + s.hidden),  # after attention and after the FFN
    analytic=lambda h, r: (2, 4 * h * r, FP32 * 4 * h, 7),
    probe=lambda r, targets: {"method": METHOD, "size": r})


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["adapter"] = "adapter"
    size: int = Field(64, ge=1, le=65536, description="bottleneck width")
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    placement: list[Literal["attention", "ffn"]] = Field(default_factory=lambda: ["attention", "ffn"], min_length=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="on the adapter's input")
    # explicit op names; when set, `placement` is not used
    target_modules: Annotated[list[str], Field(min_length=1)] | None = None
