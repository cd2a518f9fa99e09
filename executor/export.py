"""Export a task's adapter in HF PEFT's format: adapter_config.json + adapter_model.safetensors, loadable
with `PeftModel.from_pretrained(base_model, path)`."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

from muxtune.errors import MuxTuneError
from muxtune.executor.mux import MultiplexedOp, TaskAdapter

WEIGHTS_NAME, CONFIG_NAME = "adapter_model.safetensors", "adapter_config.json"


def export_adapter(adapter: TaskAdapter, model: torch.nn.Module, base_model_name: str, out_dir: Path) -> Path:
    """Write into a temp folder beside `out_dir`, then rename: a crash never leaves half an adapter."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    fan_in_fan_out = any(isinstance(_base_op(model, p), Conv1D) for p in adapter.paths)
    hf_config = adapter.method.hf_config(adapter.config, base_model_name, fan_in_fan_out,
                                         list(adapter.config.target_modules))
    state = {}
    for path, layer in adapter.items():
        state.update(layer.export_state(f"base_model.model.{path}"))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        hf_config.save_pretrained(str(tmp))
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()},
                  str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_adapter_weights(adapter: TaskAdapter, path: Path) -> None:
    """Load weights exported by `export_adapter` (or by HF PEFT) back into a task's adapter."""
    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        raise MuxTuneError(f"{path}: no {WEIGHTS_NAME}")
    state = load_file(str(file))
    try:
        for p, layer in adapter.items():
            layer.load_export_state(state, f"base_model.model.{p}")
    except KeyError as exc:
        raise MuxTuneError(f"{file}: missing tensor {exc.args[0]} (adapter from another model?)") from None
    except RuntimeError as exc:
        raise MuxTuneError(f"{file}: tensor shapes do not match this task's adapter: {exc}") from None


def _base_op(model, path):
    op = model.get_submodule(path)
    return op.base_op if isinstance(op, MultiplexedOp) else op
