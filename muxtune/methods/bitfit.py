"""BitFit: its card and its config, the torch-free half of the method (the layer:
executor/peft/bitfit.py). `muxtune.spec` reads these without importing torch."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from muxtune.method_card import FP32, MethodCard

METHOD = "bitfit"
SHAPE = "bias"
CARD = MethodCard(
    METHOD, "BitFit", SHAPE,
    params=lambda s, r: s.n_layers * (5 * s.hidden + 2 * s.intermediate),
    analytic=lambda h, r: (7, h, FP32 * 3 * h, 3),
    probe=lambda r, targets: {"method": METHOD})


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["bitfit"] = "bitfit"
    # default (None): every Linear/Conv1D op inside the transformer blocks, i.e. all but the LM head
    target_modules: Annotated[list[str], Field(min_length=1)] | None = None
