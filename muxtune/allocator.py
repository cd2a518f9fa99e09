"""Which malloc a training process runs on: tcmalloc where it is installed, so that its memory is the
memory its tensors need.

On the CPU a step's tensors come from malloc, and glibc's malloc keeps what a step frees: its mmap
threshold grows with the sizes freed, so later blocks come from the main heap, which fragments and
grows from step to step. llama-100m, 8 LoRA tenants x 256 tokens, one thread (benchmarks/memory.py's
worker, this project's AMD EPYC machine, two runs each; RSS above the process before the backbone):

  | malloc                                           | peak RSS | the tensors' peak | step   |
  | glibc (default)                                  | 2243-2293 MiB | 1483 MiB     | 10.2-10.6 s |
  | glibc, mmap threshold fixed at 4 MiB             | 1616-1619     |              | 13.8-14.4   |
  | the same with glibc.malloc.hugetlb=1             | 1601          |              | 11.8-15.0   |
  | jemalloc (Debian libjemalloc2)                   | 1537-1545     |              | 12.7-12.9   |
  | tcmalloc (gperftools, Debian libtcmalloc-minimal4) | 1571-1573   |              | 10.2-10.3   |

tcmalloc reuses freed blocks by size class (a step allocates the same sizes each time) and hands whole
spans back, so peak RSS is the tensors' peak plus ~6% at glibc's speed: admission's and the CostModel's
memory (they price tensors) then holds for the process. A library cannot change the malloc of a process
that is already running, so the processes that train are started with it preloaded: `environment()` for
a child's environment (service workers, benchmark workers), `reexec()` for the command line itself.
`MUXTUNE_MALLOC=system` keeps glibc's. Installed by `make install` (apt, best effort): without it
everything runs on glibc's malloc, as before.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

LIBRARY = "tcmalloc_minimal"  # gperftools' tcmalloc without the heap profiler (Debian libtcmalloc-minimal4)
CHOICE = "MUXTUNE_MALLOC"  # tcmalloc (default where installed) or system
_REEXECED = "MUXTUNE_MALLOC_REEXEC"  # set on the way through reexec(): never twice, even if the preload failed


def library() -> str | None:
    """The tcmalloc shared library's file name as the dynamic loader finds it, or None (not installed, or
    MUXTUNE_MALLOC=system)."""
    choice = os.environ.get(CHOICE, "tcmalloc")
    if choice not in ("tcmalloc", "system"):
        raise SystemExit(f"{CHOICE}={choice!r}: expected tcmalloc or system")
    return ctypes.util.find_library(LIBRARY) if choice == "tcmalloc" else None


def in_use() -> str:
    """The malloc this process runs on: 'tcmalloc' if it is mapped in, else 'system'."""
    maps = Path("/proc/self/maps")
    if maps.exists() and LIBRARY in maps.read_text():
        return "tcmalloc"
    return "system"


def environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """A child process's environment (a copy of `env`, default this process's) with tcmalloc preloaded
    where it is installed and chosen; otherwise unchanged."""
    env = dict(os.environ if env is None else env)
    found = library()
    if found and found not in env.get("LD_PRELOAD", "").split(":"):
        env["LD_PRELOAD"] = ":".join(filter(None, [found, env.get("LD_PRELOAD")]))
        # tcmalloc reports every block over 1 GiB on stderr ("large alloc"): a long sequence's logits are one
        env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(2**50))
    return env


def reexec() -> None:
    """Start this command line again under tcmalloc, once, when it is installed, chosen and not yet in use
    (before the command imports torch; a command line only: never call it from a library)."""
    if os.environ.get(_REEXECED) or in_use() == "tcmalloc" or library() is None:
        return
    env = environment()
    env[_REEXECED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
