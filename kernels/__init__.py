"""Grouped multi-adapter kernels (Triton) with torch references.

The executor applies every task's adapter to its own rows of the fused token matrix. On a GPU the
per-task ops are tiny and launch-bound, so `lora.segmented_lora` and `ia3.segmented_scale` do all
tasks' segments in one launch per GEMM kind (forward and backward). Which path runs is one switch:

    MUXTUNE_KERNELS=auto    (default) Triton on CUDA tensors, the torch path elsewhere
    MUXTUNE_KERNELS=triton  always Triton; on CPU this needs TRITON_INTERPRET=1 set before start-up
    MUXTUNE_KERNELS=torch   never Triton

The torch path stays the default on CPU because it is the one proven bit-identical to HF PEFT (for LoRA
it is `lora.looped_lora`: one autograd node per op for all tasks, a matmul pair per task).
"""

from __future__ import annotations

import os

import torch

from muxtune.errors import MuxTuneError

CHOICES = ("auto", "triton", "torch")


def backend(device: torch.device, choice: str | None = None) -> str:
    """'triton' or 'torch' for tensors on `device` (choice defaults to $MUXTUNE_KERNELS)."""
    choice = choice or os.environ.get("MUXTUNE_KERNELS", "auto")
    if choice not in CHOICES:
        raise MuxTuneError(f"MUXTUNE_KERNELS={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise MuxTuneError("MUXTUNE_KERNELS=triton on CPU needs TRITON_INTERPRET=1 in the environment "
                           "(set before start-up); or use MUXTUNE_KERNELS=torch")
    return choice


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
