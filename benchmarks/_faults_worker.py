"""One `muxtune run` for benchmarks.faults that reports each finished step on stdout ("start N" first,
then "step N"), so the parent can kill it at a known step. With `--plan`, a multi-process plan: rank 0
reports the steps (`report_step` is sent to the spawned processes, hence a module-level function).
Not a user entry point."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from muxtune.run import execute
from muxtune.spec import Plan, load_config


def report_step(trainer) -> None:
    print(f"step {len(trainer.step_times)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--plan")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    start = json.loads((out / "checkpoints" / "manifest.json").read_text())["steps"] if args.resume else 0
    print(f"start {start}", flush=True)
    execute(load_config(args.config), out, plan=Plan.load(args.plan) if args.plan else None, progress=False,
            resume=args.resume, after_step=report_step)


if __name__ == "__main__":
    main()
