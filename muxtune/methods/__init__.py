"""Each PEFT method's torch-free half: its `peft.method` name, its card (muxtune/method_card.py) and its
pydantic Config, one module per method. `muxtune.spec` builds a task's `peft:` section from them, so the
vocabulary (and the planner, simulator and CostModel that use it) loads without torch.

A method module here defines METHOD, SHAPE, CARD and Config; its layer lives in executor/peft/<method>.py
(which imports these). A method of another package is one module found through its `muxtune.peft_methods`
entry point (name = METHOD, value = the module) that holds both halves, e.g. in its pyproject.toml:
[project.entry-points."muxtune.peft_methods"] scaled = "pkg.scaled".
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
