"""Run by tests/test_extra_method.py in a process whose sys.path holds the `scaled` method's entry point:
profile it, plan, simulate and train a config that fuses it with a LoRA task; print one JSON line."""

import json
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

from muxtune.executor.export import WEIGHTS_NAME
from muxtune.profiler.cost_model import CostModel, MicroBatch, TaskLoad
from muxtune.profiler.profile import run_profile
from muxtune.run import plan_and_run
from muxtune.simulator.workload import estimate_params
from muxtune.spec import load_config

tmp = Path(sys.argv[1])
profile = run_profile("builtin:tiny-llama", "cpu", "quick", comm=False, progress=False, budget=15.0,
                      methods=["lora", "scaled"], targets=["q_proj", "v_proj"])
profile.save(tmp / "profile.csv")
for name, seed in (("a", 1), ("b", 2)):
    (tmp / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"sample {seed} {i} " * (3 + i % 5)}) + "\n"
                                               for i in range(24)))
config = {"name": "extra", "model": "builtin:tiny-llama", "devices": "cpu", "tasks": [
    {"name": "lora", "data": "a.jsonl", "peft": {"method": "lora", "r": 4}, "batch_size": 4, "max_seq_len": 32,
     "steps": 6, "seed": 0, "lr": 1e-2},
    {"name": "gain", "data": "b.jsonl", "peft": {"method": "scaled"}, "batch_size": 4, "max_seq_len": 32,
     "steps": 6, "seed": 1, "lr": 1e-2}]}
(tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
prediction, metrics = plan_and_run(load_config(tmp / "config.yaml"), tmp / "out", profile=str(tmp / "profile.csv"),
                                   progress=False)
cm = CostModel.from_profile(str(tmp / "profile.csv"))
print(json.dumps({
    "profiled": sorted(set(profile.rows("task")["method"])),
    "plan_tasks": sorted(t for g in prediction.plans["muxtune"].groups for t in g.tasks),
    "predicted_step_s": prediction.timeline.step_seconds,
    "predicted_memory": prediction.memory.to_dict("records"),
    "tasks": {name: {k: t[k] for k in ("method", "status", "steps", "loss", "trainable_params")}
              for name, t in metrics["tasks"].items()},
    "estimated_params": estimate_params("scaled", 0, cm.shape),
    "priced_step_s": cm.step_seconds([MicroBatch((TaskLoad("scaled", 0, 128, 1),), 32)]),
    "adapter_files": sorted(p.name for p in (tmp / "out" / "adapters" / "gain").iterdir()),
    "largest_gain": max(float(t.abs().max()) for t in load_file(tmp / "out" / "adapters" / "gain" / WEIGHTS_NAME).values()),
}))
