"""Unified PEFT methods: one module per method, its layer (the torch half) beside its config and card.

A method module defines (METHOD, SHAPE, CARD and Config imported from its torch-free half,
muxtune/methods/<method>.py, which muxtune.spec reads):
  METHOD     the `peft.method` string in a task config
  Config     a pydantic model of that method's parameters (with a `method: Literal[METHOD]` field)
  SHAPE      how the adapter meets the frozen backbone op (see DESIGN.md), e.g. "parallel"
  build_layer(config, base_op, path, generator) -> nn.Module for one (task, target op) pair, with
      aggregate(x, out, dropout_mask) -> out   this task's rows of the op's input and shared output
                                               -> its rows of the op's new output
      dispatch(x) -> x  (optional)             transform this task's rows of the op's input before
                                               the shared op runs (e.g. IA3 on feed-forward ops)
      export_state(prefix) / load_export_state(state, prefix)
  hf_config(config, base_model_name, fan_in_fan_out) -> HF PEFT config for export, or None when HF
      PEFT lacks the method (then export writes MuxTune's own format, see executor/export.py)
  resolve(config, model) -> config  (optional)  fill model-dependent defaults, e.g. target modules
  CARD       a muxtune.method_card.MethodCard: what the profiler, CostModel, simulator, planner and
             admission know of the method (its parameter count, roofline, profile probe, ...), plain data
Sequence-level methods (prompt, prefix) define instead of build_layer:
  build_sequence(config, model, max_seq_len, generator, task) -> nn.Module with
      lead_tokens + prepend(embeds)            slots reserved at the start of the task's rows (prompt)
      prefix_tokens + key_values(rows, dtype)  a KV prefix for every attention layer (prefix)
      export_state() / load_export_state(state)

A method is found through its torch-free half (muxtune/methods/: that folder, or a `muxtune.peft_methods`
entry point), so adding one touches its file here and its file there (plus its test); a method module of
another package holds both halves in its one module.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from muxtune import methods
from muxtune.methods import PeftConfig  # noqa: F401  (one union of the Configs, built there)


def _layer_module(half: ModuleType) -> ModuleType:
    """A built-in method's layer is this folder's module of its name; a method of another package keeps
    both halves in its one module."""
    if half.__name__.startswith(f"{methods.__name__}."):
        return importlib.import_module(f"{__name__}.{half.__name__.rsplit('.', 1)[1]}")
    return half


METHODS: dict[str, ModuleType] = {name: _layer_module(half) for name, half in methods.METHODS.items()}


def method_of(config) -> ModuleType:
    return METHODS[config.method]
