"""DoRA: its card and its config, the torch-free half of the method (the layer:
executor/peft/dora.py). `muxtune.spec` reads these without importing torch."""

from __future__ import annotations

from typing import Literal

from muxtune.method_card import FP32, MethodCard, kv_width
from muxtune.methods import lora

METHOD = "dora"
SHAPE = "parallel"
CARD = MethodCard(
    METHOD, "DoRA", SHAPE,
    # LoRA's q_proj and v_proj + their magnitudes
    params=lambda s, r: lora.CARD.params(s, r) + s.n_layers * (s.hidden + kv_width(s)),
    analytic=lambda h, r: (2, 4 * h * r + 4 * h, FP32 * 6 * h, 12),
    probe=lambda r, targets: {"method": METHOD, "r": r, "target_modules": targets},
    targeted=True)


class Config(lora.Config):
    """LoRA's keys (r, alpha, dropout, target_modules, use_rslora) and semantics; only the method differs."""

    method: Literal["dora"] = "dora"
