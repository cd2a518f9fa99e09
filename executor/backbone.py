"""The shared frozen backbone: built-in presets (seeded random weights, no download) or a real HF model.

Built-in presets are the paper's three families, built from transformers configs: LLaMA (nn.Linear),
GPT-2 (transformers' Conv1D) and OPT. They use `ByteTokenizer`, which needs no vocabulary file.
The backbone runs in eval mode (its own dropout off) and never receives gradients; only the tasks'
adapters train, with their own seeded dropout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig
from transformers.pytorch_utils import Conv1D

from muxtune.errors import MuxTuneError

PAD, BOS, EOS = 256, 257, 258
BYTE_VOCAB = 260  # 256 bytes + pad/bos/eos, rounded up to an even size


class ByteTokenizer:
    """UTF-8 bytes as token ids: no vocabulary to download, any text round-trips."""

    pad_token_id, bos_token_id, eos_token_id, vocab_size = PAD, BOS, EOS, BYTE_VOCAB

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A real model's own tokenizer behind the same small interface as ByteTokenizer."""

    def __init__(self, name: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(name)
        self.bos_token_id = self.tok.bos_token_id
        self.eos_token_id = self.tok.eos_token_id
        pad = self.tok.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eos_token_id or 0)
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def _special(cfg_cls, **kw):
    return cfg_cls(vocab_size=BYTE_VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, **kw)


# Every preset disables the backbone's own dropout: a frozen backbone is run deterministically so a
# task's result depends on its own seed alone.
def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int):
    return lambda: _special(LlamaConfig, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                            tie_word_embeddings=False)


def _gpt2(hidden: int, layers: int, heads: int):
    return lambda: _special(GPT2Config, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=4096,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


PRESETS = {
    "tiny-llama": _llama(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2),
    "tiny-gpt2": _gpt2(hidden=64, layers=2, heads=4),
    "tiny-opt": lambda: _special(
        OPTConfig, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=4096, word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0,
    ),
    # Benchmark presets: big enough that weights dominate a process's memory.
    "llama-100m": _llama(hidden=768, intermediate=2048, layers=12, heads=12, kv_heads=12),
    # ~1B parameters in TinyLlama-1.1B's shape (grouped-query attention): the GPU headline benchmark's
    # backbone (benchmarks/device/all.sh), in bf16 there; the byte vocabulary keeps it download-free
    "llama-1b": _llama(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4),
    "gpt2-100m": _gpt2(hidden=768, layers=12, heads=12),
}

PRESET_SEED = 1234


@dataclass
class Backbone:
    model: nn.Module  # a transformers *ForCausalLM, frozen
    tokenizer: ByteTokenizer | HFTokenizer
    name: str  # what the user wrote: "builtin:tiny-llama", a hub id or a local dir


def preset_config(name: str, attn_implementation: str = "sdpa"):
    key = name.removeprefix("builtin:")
    if key not in PRESETS:
        raise MuxTuneError(f"model: unknown builtin preset {name!r}; choose from "
                           + ", ".join(f"builtin:{k}" for k in PRESETS))
    config = PRESETS[key]()
    config._attn_implementation = attn_implementation
    return config


def model_config(name: str):
    """The model's transformers config (a builtin preset's, or a local dir's / hub id's), without weights."""
    if name.startswith("builtin:"):
        return preset_config(name)
    try:
        return AutoConfig.from_pretrained(name)
    except Exception as exc:  # transformers raises OSError/ValueError/... for a bad id or dir
        raise MuxTuneError(f"model: cannot load {name!r}: {exc}") from None


def load_backbone(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  attn_implementation: str = "sdpa") -> Backbone:
    """Build a preset with seeded weights, or load a real model with `from_pretrained`."""
    if name.startswith("builtin:"):
        config = preset_config(name, attn_implementation)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(PRESET_SEED)
            model = AutoModelForCausalLM.from_config(config)
        tokenizer = ByteTokenizer()
    else:
        try:
            AutoConfig.from_pretrained(name)
        except Exception as exc:  # transformers raises OSError/ValueError/... for a bad id or dir
            raise MuxTuneError(f"model: cannot load {name!r}: {exc}") from None
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation=attn_implementation)
        tokenizer = HFTokenizer(name)
    model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return Backbone(model=model, tokenizer=tokenizer, name=name)


def target_ops(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module]]:
    """(path, op) of every nn.Linear / Conv1D whose name matches a target the way HF PEFT matches
    (`name == t` or `name.endswith('.' + t)`), in the model's module order."""
    found = []
    for path, module in model.named_modules():
        if any(path == t or path.endswith("." + t) for t in targets):
            if isinstance(module, (nn.Linear, Conv1D)):
                found.append((path, module))
            elif hasattr(module, "base_op"):  # already multiplexed
                found.append((path, module))
    return found


def op_features(op: nn.Module) -> tuple[int, int]:
    """(in_features, out_features); transformers' Conv1D stores its weight as [in, out]."""
    if isinstance(op, Conv1D):
        return op.weight.shape[0], op.weight.shape[1]
    return op.in_features, op.out_features
