"""Unified PEFT methods: one module per method, each holding its config and its layer together.

A method module defines:
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

Methods are discovered from this folder, so adding one touches one file (plus its test); a method
module of another package is found through its `muxtune.peft_methods` entry point (name = METHOD, value =
the module), e.g. in its pyproject.toml: [project.entry-points."muxtune.peft_methods"] scaled = "pkg.scaled".
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from types import ModuleType
from typing import Annotated, Union

from pydantic import Field

METHODS: dict[str, ModuleType] = {}
for _info in pkgutil.iter_modules(__path__):
    if _info.name.startswith("_"):
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    METHODS[_module.METHOD] = _module
for _entry in entry_points(group="muxtune.peft_methods"):
    _module = _entry.load()
    METHODS.setdefault(_module.METHOD, _module)  # a built-in method keeps its name

# A task's `peft:` section: pydantic picks the Config class by its `method` key.
PeftConfig = Annotated[Union[tuple(m.Config for m in METHODS.values())], Field(discriminator="method")]


def method_of(config) -> ModuleType:
    return METHODS[config.method]
