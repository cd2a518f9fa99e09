"""MuxTune: many tenants' PEFT jobs multiplexed on one shared frozen LLM backbone."""

import os
import sys
from pathlib import Path

__version__ = "0.1.0"


def _keep_checkout_root_off_sys_path() -> None:
    """Our top-level folders (kernels/, planner/, profiler/, ...) are installed as `muxtune.<folder>`; a
    checkout root on sys.path (`python -m ...` or `python -c` from the root puts it first) would make them
    importable under their bare names too, and `kernels/` then shadows the Hugging Face `kernels` package
    that transformers imports. Every entry point imports muxtune before transformers, so dropping the root
    here keeps every bare name for the installed distributions. Only in a checkout: an installed wheel has
    no such siblings."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "kernels" / "__init__.py").is_file() or not (root / "pyproject.toml").is_file():
        return
    here = os.getcwd()
    sys.path[:] = [entry for entry in sys.path if Path(entry or here).resolve() != root]


_keep_checkout_root_off_sys_path()
