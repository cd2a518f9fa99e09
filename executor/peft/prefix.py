"""Prefix tuning (Li & Liang 2021): per-task learned key/value prefixes in every attention layer.

Shape "attention prefix": the fused batch carries one KV prefix region as long as the longest prefix
among its tasks; a task's rows see their own prefix there (right-aligned), other rows see it masked
out. A prefix task's real tokens take positions n..n+len-1, as with HF PEFT's past_key_values. The
parameters are HF PEFT's (no projection): one [n, layers * 2 * kv_heads * head_dim] embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from muxtune.executor.peft.prompt import VirtualTokens, _check_fits
from muxtune.methods.prefix import CARD, METHOD, SHAPE, Config  # noqa: F401  (its torch-free half)


def kv_geometry(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the backbone's attention, as HF PEFT derives them."""
    cfg = model.config
    layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    hidden = cfg.hidden_size
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return layers, kv_heads, head_dim


class PrefixKV(VirtualTokens):
    def __init__(self, config: Config, model: nn.Module, generator: torch.Generator):
        layers, kv_heads, head_dim = kv_geometry(model)
        super().__init__(config.num_virtual_tokens, layers * 2 * kv_heads * head_dim, generator)
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim

    @property
    def prefix_tokens(self) -> int:
        return self.num_virtual_tokens

    def key_values(self, rows: int, dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (k, v), each [rows, kv_heads, n, head_dim]; the same reshaping as HF PEFT's get_prompt."""
        n = self.num_virtual_tokens
        kv = self.embedding.weight.to(dtype).unsqueeze(0).expand(rows, -1, -1)
        kv = kv.view(rows, n, self.layers * 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return [(pair[0], pair[1]) for pair in kv.split(2)]


def build_sequence(config: Config, model: nn.Module, max_seq_len: int, generator: torch.Generator,
                   task: str) -> PrefixKV:
    _check_fits(model, config.num_virtual_tokens + max_seq_len, task)
    return PrefixKV(config, model, generator)


def hf_config(config: Config, base_model_name: str, fan_in_fan_out: bool):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=config.num_virtual_tokens,
                              base_model_name_or_path=base_model_name)
