"""prefix tuning: its card and its config, the torch-free half of the method (the layer:
executor/peft/prefix.py). `muxtune.spec` reads these without importing torch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from muxtune.method_card import FP32, MethodCard, kv_width

METHOD = "prefix"
SHAPE = "attention prefix"
CARD = MethodCard(
    METHOD, "prefix tuning", SHAPE,
    params=lambda s, r: s.n_layers * 2 * r * kv_width(s),  # a key and a value per virtual token
    analytic=lambda h, r: (1, 4 * r * h, FP32 * 2 * h, 4),
    probe=lambda r, targets: {"method": METHOD, "num_virtual_tokens": r},
    kv_prefix=True, pipeline_stages=False)  # its K/V prefix spans every layer (executor/pipeline.py)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(20, ge=1, le=4096)
