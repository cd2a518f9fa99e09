"""Prompt tuning (Lester et al. 2021): per-task learned virtual token embeddings prepended to the input.

Shape "input": the task's rows of the fused batch start with `num_virtual_tokens` slots (reserved by
`fuse`, attention on, no loss) whose embeddings are the task's parameters. The virtual tokens take
positions 0..n-1 and the real tokens follow, as in HF PEFT. Other tasks' rows are untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from muxtune.methods.prompt import CARD, METHOD, SHAPE, Config  # noqa: F401  (its torch-free half)


class VirtualTokens(nn.Module):
    """`num_virtual_tokens` learned rows of `width` values, saved as HF PEFT's `prompt_embeddings`.
    HF PEFT's RANDOM init is nn.Embedding's N(0, 1); drawn here from the task's own generator."""

    def __init__(self, num_virtual_tokens: int, width: int, generator: torch.Generator):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = nn.Embedding(num_virtual_tokens, width)
        with torch.no_grad():
            self.embedding.weight.normal_(generator=generator)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.embedding.weight}

    def load_export_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.embedding.weight.copy_(state["prompt_embeddings"])


class PromptEmbeddings(VirtualTokens):
    def __init__(self, config: Config, model: nn.Module, generator: torch.Generator):
        super().__init__(config.num_virtual_tokens, model.get_input_embeddings().weight.shape[1], generator)

    @property
    def lead_tokens(self) -> int:
        """Slots this task's rows reserve at their start."""
        return self.num_virtual_tokens

    def prepend(self, embeds: torch.Tensor) -> torch.Tensor:
        """[rows, seq, dim] embeddings whose first n slots are placeholders -> virtual tokens there."""
        rows = embeds.shape[0]
        prompt = self.embedding.weight.to(embeds.dtype).unsqueeze(0).expand(rows, -1, -1)
        return torch.cat([prompt, embeds[:, self.num_virtual_tokens :]], dim=1)


def build_sequence(config: Config, model: nn.Module, max_seq_len: int, generator: torch.Generator,
                   task: str) -> PromptEmbeddings:
    _check_fits(model, config.num_virtual_tokens + max_seq_len, task)
    return PromptEmbeddings(config, model, generator)


def _check_fits(model: nn.Module, length: int, task: str) -> None:
    from muxtune.errors import MuxTuneError

    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and length > limit:
        raise MuxTuneError(f"task {task!r}: peft.num_virtual_tokens + max_seq_len = {length} exceeds the "
                           f"model's max_position_embeddings ({limit})")


def hf_config(config: Config, base_model_name: str, fan_in_fan_out: bool):
    from peft import PromptTuningConfig

    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=config.num_virtual_tokens,
                              base_model_name_or_path=base_model_name)
