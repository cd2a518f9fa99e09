"""prompt tuning: its card and its config, the torch-free half of the method (the layer:
executor/peft/prompt.py). `muxtune.spec` reads these without importing torch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from muxtune.method_card import MethodCard

METHOD = "prompt"
SHAPE = "input"
CARD = MethodCard(
    METHOD, "prompt tuning", SHAPE,
    params=lambda s, r: r * s.hidden,  # one embedding row per virtual token, with the embedding
    analytic=lambda h, r: (0, 0, 0, 0),
    probe=lambda r, targets: {"method": METHOD, "num_virtual_tokens": r},
    lead_slots=True, on_first_stage=True)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(20, ge=1, le=4096)
