"""One `muxtune run` for benchmarks.faults that reports each finished step on stdout ("start N" first,
then "step N"), so the parent can kill it at a known step. Not a user entry point."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from muxtune.run import execute
from muxtune.spec import load_config


def main() -> None:
    config, out = load_config(sys.argv[1]), Path(sys.argv[2])
    resume = "--resume" in sys.argv[3:]
    start = json.loads((out / "checkpoints" / "manifest.json").read_text())["steps"] if resume else 0
    print(f"start {start}", flush=True)
    execute(config, out, progress=False, resume=resume,
            after_step=lambda trainer: print(f"step {len(trainer.step_times)}", flush=True))


if __name__ == "__main__":
    main()
