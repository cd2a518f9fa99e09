"""What the CostModel prices: one task's share of a fused micro-batch (TaskLoad), the micro-batch
(MicroBatch), and the backbone's shape (ModelShape), all plain frozen data."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from muxtune.schedule import TENSOR_PARALLEL_FAMILIES
from muxtune.spec import method_card


@dataclass(frozen=True)
class TaskLoad:
    """One task's share of a fused micro-batch."""

    method: str  # a PEFT method's name (its card: muxtune.spec.method_card)
    rank: int  # LoRA/DoRA rank, adapter bottleneck size, prefix/prompt virtual tokens; 0 if none
    tokens: int  # token slots this task occupies in the micro-batch (its rows x seq_len, padding included)
    params: int  # the task's trainable parameter count (optimizer step, memory)
    # LoRA/DoRA: the op names it targets in every layer (() = the profile's task_targets, the defaults its
    # method rows were measured on) and its dropout probability: both change what it costs
    targets: tuple[str, ...] = ()
    dropout: float = 0.0


@dataclass(frozen=True)
class MicroBatch:
    tasks: tuple[TaskLoad, ...]
    seq_len: int  # attention span of one sequence (chunk length / padded length)

    @property
    def tokens(self) -> int:
        return sum(t.tokens for t in self.tasks)

    @property
    def span(self) -> int:
        """Keys each query attends over: the sequence plus the longest KV prefix in the batch."""
        return self.seq_len + max((t.rank for t in self.tasks if method_card(t.method).kv_prefix), default=0)


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    dtype_bytes: int
    gated_mlp: bool = True  # LLaMA's gate/up/down (3 matrices) vs GPT-2/OPT's up/down (2)
    tied_embeddings: bool = False

    @classmethod
    def from_config(cls, config, dtype=None) -> ModelShape:
        import torch

        get = lambda *names, default=None: next((getattr(config, n) for n in names
                                                 if getattr(config, n, None) is not None), default)
        hidden = get("hidden_size", "n_embd")
        heads = get("num_attention_heads", "n_head")
        return cls(n_layers=get("num_hidden_layers", "n_layer"), hidden=hidden,
                   intermediate=get("intermediate_size", "ffn_dim", "n_inner", default=4 * hidden),
                   heads=heads, kv_heads=get("num_key_value_heads", default=heads), vocab=config.vocab_size,
                   dtype_bytes=(dtype or torch.float32).itemsize, gated_mlp=config.model_type in TENSOR_PARALLEL_FAMILIES,
                   tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)))

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def layer_params(self) -> int:
        kv = self.hidden * self.kv_heads // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * kv
        return attention + (3 if self.gated_mlp else 2) * self.hidden * self.intermediate


def llama_7b_shape(dtype_bytes: int = 2) -> ModelShape:
    """LLaMA-2-7B's shape (no weights needed): what-if planning for GPUs and models we do not have."""
    return ModelShape(n_layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000,
                      dtype_bytes=dtype_bytes, gated_mlp=True)
