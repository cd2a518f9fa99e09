"""GPU check of the distributed executor with NCCL (run by benchmarks/device/pipeline.sh): the Plan on
the machine's GPUs (2 GPUs: a 2-stage pipeline with interleaved groups, and 2 data-parallel replicas;
1 GPU: one NCCL process, pp=1) trains every task to the single-process executor's losses and weights."""

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from test_equivalence import TARGETS, three_tasks  # noqa: E402

from muxtune.executor.backbone import load_backbone  # noqa: E402
from muxtune.executor.data import load_examples  # noqa: E402
from muxtune.executor.trainer import MultiplexedTrainer  # noqa: E402
from muxtune.run import execute  # noqa: E402
from muxtune.spec import Alignment, FusionGroup, Layout, Plan, RunConfig  # noqa: E402

MODEL, GROUPS, ALIGN = "builtin:tiny-llama", [["short", "long"], ["medium"]], Alignment(chunk_len=16)


def main() -> int:
    n = min(2, torch.cuda.device_count())
    devices = [f"cuda:{i}" for i in range(n)]
    layouts = [Layout(pp=2), Layout(dp=2)] if n == 2 else [Layout()]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        specs = three_tasks(tmp, TARGETS[MODEL])
        config = RunConfig(name="gpu", model=MODEL, devices="cuda", tasks=specs)
        backbone = load_backbone(MODEL, device="cuda:0")
        examples = {s.name: load_examples(s.data, backbone.tokenizer, s.max_seq_len)[0] for s in specs}
        reference = MultiplexedTrainer(backbone, specs, examples, groups=GROUPS, alignment=ALIGN)
        reference.train(progress=False)
        for layout in layouts:
            plan = Plan(groups=[FusionGroup(tasks=g, devices=devices, layout=layout, micro_batches=2) for g in GROUPS],
                        schedule="interleaved", alignment=ALIGN)
            out = tmp / f"dp{layout.dp}pp{layout.pp}"
            metrics = execute(config, out, plan=plan, progress=False)
            for name, run in reference.runs.items():
                loss = max(abs(a - b) / abs(b) for a, b in zip(metrics["tasks"][name]["loss"], run.losses))
                state = load_file(str(out / "adapters" / name / "adapter_model.safetensors"))
                weight = max((state[k] - v.detach().cpu()).abs().max().item() for k, v in run.adapter.export_state().items())
                ok = loss < 1e-5 and weight < 1e-5
                failures += not ok
                print(f"dp={layout.dp} pp={layout.pp} {name}: loss rel diff {loss:.2e}, weight abs diff {weight:.2e}",
                      "ok" if ok else "MISMATCH")
    print("equivalence:", "PASS" if failures == 0 else f"FAIL ({failures})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
