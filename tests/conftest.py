import os
import sys
import tempfile
from pathlib import Path

# Triton kernels (a later issue) run on CPU only in the interpreter, which must be set before any @triton.jit.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tokenized-data cache (executor/data.py): one fresh folder per test session, never the repo's
os.environ.setdefault("MUXTUNE_CACHE", tempfile.mkdtemp(prefix="muxtune-cache-"))

import muxtune  # noqa: F401  first: keeps the checkout root off sys.path (see muxtune/__init__.py)
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

# Tiny test models: a second thread costs more in synchronisation than it saves.
torch.set_num_threads(1)


@pytest.fixture
def repo() -> Path:
    return REPO
