"""The inputs of planning (a front door, beside run.py): what `muxtune plan` plans with: the cluster, the CostModel and the tasks' parameter counts, from a
config and the command line (command line first, then the config's `cluster:` section, then this machine).

- `--hardware h100 --gpus 16`, or a cluster whose hardware is a catalog name: the analytic CostModel of
  that GPU for the config's model shape (calibrated by `--profile` if one measured on a catalog GPU is given);
  memory per device defaults to the catalog's.
- otherwise this machine: the profile given, else the cached profile of this device (measured now if
  there is none; `muxtune profile` makes one ahead); memory defaults to the config's memory_limit_gib,
  else what the device has free.
"""

from __future__ import annotations

import dataclasses

import psutil
import torch
from transformers import AutoConfig

from muxtune.errors import MuxTuneError
from muxtune.executor.backbone import load_backbone, preset_config
from muxtune.profiler.cost_model import CostModel, ModelShape, cost_model_for, hardware as catalog_row
from muxtune.simulator.workload import count_trainable_params
from muxtune.spec import DTYPE_BYTES, Cluster, RunConfig

GIB = 2**30


def model_shape(config: RunConfig):
    if config.model.startswith("builtin:"):
        hf_config = preset_config(config.model)
    else:
        try:
            hf_config = AutoConfig.from_pretrained(config.model)
        except Exception as exc:  # transformers raises OSError/ValueError/... for a bad id or dir
            raise MuxTuneError(f"model: cannot load {config.model!r}: {exc}") from None
    return dataclasses.replace(ModelShape.from_config(hf_config), dtype_bytes=DTYPE_BYTES[config.dtype])


def exact_params(config: RunConfig) -> dict[str, int] | None:
    """Trainable parameters of each task, counted on the real backbone for builtin presets (cheap to
    build); None for other models (the planner then estimates them from method and rank)."""
    if not config.model.startswith("builtin:"):
        return None
    model = load_backbone(config.model).model
    return {t.name: count_trainable_params(t, model) for t in config.tasks}


def free_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0] / GIB
    return psutil.virtual_memory().available / GIB


def planning_inputs(config: RunConfig, hardware: str | None = None, gpus: int | None = None,
                    memory_gib: float | None = None, profile: str | None = None):
    """(Cluster, CostModel, exact parameter counts or None) for planning `config`."""
    given = config.cluster
    if gpus is not None and gpus < 1:
        raise MuxTuneError(f"--gpus: needs at least 1 device, got {gpus}")
    if memory_gib is not None and memory_gib <= 0:
        raise MuxTuneError(f"--memory-gib: must be > 0, got {memory_gib}")
    name = hardware or (given.hardware if given and given.hardware != "this" else None)
    devices = gpus or (given.devices if given else len(config.device_list()))
    if name:
        row = catalog_row(name)
        cost_model = CostModel.analytic(row["name"], model_shape(config))
        if profile:
            cost_model.calibrate(profile)
        memory = memory_gib or (given.memory_gib if given and not hardware else row["memory_gb"] * 1e9 / GIB)
        cluster = Cluster(devices=devices, memory_gib=memory, hardware=row["name"])
    else:
        device = "cpu" if config.devices == "cpu" else config.device_list()[0]
        cost_model = CostModel.from_profile(profile) if profile else cost_model_for(config.model, device, progress=True)
        memory = memory_gib or (given.memory_gib if given else config.memory_limit_gib) or free_memory_gib(device)
        cluster = Cluster(devices=devices, memory_gib=memory, hardware="this")
    return cluster, cost_model, exact_params(config)
