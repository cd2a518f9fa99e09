"""MuxTune: many tenants' PEFT jobs multiplexed on one shared frozen LLM backbone."""

import importlib.abc
import importlib.machinery
import os
import sys
from pathlib import Path

__version__ = "0.1.0"

_CHECKOUT = Path(__file__).resolve().parent.parent


class _BareNamesAreNotOurs(importlib.abc.MetaPathFinder):
    """Our top-level folders kernels/, planner/, profiler/, simulator/, executor/ are installed as
    `muxtune.<folder>`. With a checkout root on sys.path (`python -m ...` or `python -c` from the root put it
    first) they would also import under their bare names, which belong to other distributions: transformers
    imports the Hugging Face `kernels` package at start-up. This finder resolves those bare names on
    sys.path without the checkout root, so they get the installed package or a plain ModuleNotFoundError.
    The root itself stays on sys.path: `python -m benchmarks.<name>` and the processes it spawns need it.
    Every entry point imports muxtune before transformers (tests/test_install.py checks them)."""

    def __init__(self, names: set[str]):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if path is not None or name not in self.names:
            return None
        here = os.getcwd()
        elsewhere = [entry for entry in sys.path if Path(entry or here).resolve() != _CHECKOUT]
        spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return spec


def _guard_bare_names() -> None:
    if any(isinstance(finder, _BareNamesAreNotOurs) for finder in sys.meta_path):
        return
    # only in a checkout (an installed wheel has no such siblings): its folders that are our subpackages
    names = {p.parent.name for p in _CHECKOUT.glob("*/__init__.py")} - {"muxtune", "benchmarks"}
    if (_CHECKOUT / "pyproject.toml").is_file() and names:
        sys.meta_path.insert(0, _BareNamesAreNotOurs(names))


_guard_bare_names()
