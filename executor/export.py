"""Export a task's adapter: adapter_config.json + adapter_model.safetensors.

Methods HF PEFT has are written in its format and load with `PeftModel.from_pretrained(base, path)`.
Methods it lacks (a method's `hf_config` returns None) are written in MuxTune's format: the same two
files, the JSON being `{"format": "muxtune", "version": 1, "method", "base_model_name_or_path",
"peft": <the task's peft config>}` and the tensors under the keys `base_model.model.<op path>.<name>`;
`load_exported` loads either format onto a backbone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import TypeAdapter, ValidationError
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

from muxtune.errors import MuxTuneError
from muxtune.executor.mux import MultiplexedOp, Multiplexer, TaskAdapter
from muxtune.spec import staged_directory

WEIGHTS_NAME, CONFIG_NAME = "adapter_model.safetensors", "adapter_config.json"
MUXTUNE_FORMAT_VERSION = 1


def export_adapter(adapter: TaskAdapter, model: torch.nn.Module, base_model_name: str, out_dir: Path) -> Path:
    """Write into a staging folder beside `out_dir`, then rename: a crash never leaves half an adapter."""
    fan_in_fan_out = any(isinstance(_base_op(model, p), Conv1D) for p in adapter.paths)
    hf_config = adapter.method.hf_config(adapter.config, base_model_name, fan_in_fan_out)
    state = adapter.export_state()
    with staged_directory(out_dir) as tmp:
        if hf_config is not None:
            hf_config.save_pretrained(str(tmp))
        else:
            meta = {"format": "muxtune", "version": MUXTUNE_FORMAT_VERSION, "method": adapter.config.method,
                    "base_model_name_or_path": base_model_name, "peft": adapter.config.model_dump(mode="json")}
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()},
                  str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    return out_dir


def load_adapter_weights(adapter: TaskAdapter, path: Path) -> None:
    """Load exported weights back into a task's adapter (same method, targets and sizes)."""
    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        raise MuxTuneError(f"{path}: no {WEIGHTS_NAME}")
    state = load_file(str(file))
    try:
        adapter.load_export_state(state)
    except KeyError as exc:
        raise MuxTuneError(f"{file}: missing tensor {exc.args[0]} (adapter from another model?)") from None
    except RuntimeError as exc:
        raise MuxTuneError(f"{file}: tensor shapes do not match this task's adapter: {exc}") from None


def load_exported(path: Path, model: torch.nn.Module, name: str = "exported") -> tuple[Multiplexer, TaskAdapter]:
    """Attach an exported MuxTune-format adapter to `model` (wrapped in place). Run the model inside
    `mux.route([Segment(name, 0, rows)], seq, training=False)` to apply it."""
    from muxtune.executor.peft import PeftConfig

    path = Path(path)
    try:
        meta = json.loads((path / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise MuxTuneError(f"{path}: no {CONFIG_NAME}") from None
    except json.JSONDecodeError as exc:
        raise MuxTuneError(f"{path / CONFIG_NAME}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    if meta.get("format") != "muxtune" or meta.get("version") != MUXTUNE_FORMAT_VERSION:
        raise MuxTuneError(f"{path / CONFIG_NAME}: not a MuxTune v{MUXTUNE_FORMAT_VERSION} adapter "
                           "(HF PEFT adapters load with PeftModel.from_pretrained)")
    try:
        config = TypeAdapter(PeftConfig).validate_python(meta["peft"])
    except (KeyError, ValidationError) as exc:
        raise MuxTuneError(f"{path / CONFIG_NAME}: bad 'peft' section: {exc}") from None
    mux = Multiplexer.attach(model)
    adapter = mux.add_task(name, config, seed=0, max_seq_len=1)
    load_adapter_weights(adapter, path)
    return mux, adapter


def _base_op(model, path):
    op = model.get_submodule(path)
    return op.base_op if isinstance(op, MultiplexedOp) else op
