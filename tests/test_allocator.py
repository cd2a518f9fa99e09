"""The processes that train run on tcmalloc where it is installed (muxtune/allocator.py): glibc's malloc
keeps what a step frees, so a process's memory would not be the tensors' memory that admission prices."""

import os
import subprocess
import sys

import pytest

from muxtune import allocator

MALLOC_OF_CHILD = "from muxtune import allocator; print(allocator.in_use())"


def child_malloc(env: dict) -> str:
    done = subprocess.run([sys.executable, "-P", "-c", MALLOC_OF_CHILD], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_child_started_with_the_environment_runs_on_tcmalloc_where_installed(monkeypatch):
    monkeypatch.delenv(allocator.CHOICE, raising=False)
    plain = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    assert child_malloc(plain) == "system"  # a plain child: glibc's
    env = allocator.environment(plain)
    if allocator.library() is None:  # `make malloc` could not install it: everything stays on glibc's
        assert env == plain and child_malloc(env) == "system"
        return
    assert env["LD_PRELOAD"] == allocator.library()
    assert child_malloc(env) == "tcmalloc"
    # what was preloaded before stays, and tcmalloc is not added twice
    again = allocator.environment({**env, "LD_PRELOAD": env["LD_PRELOAD"] + ":libm.so.6"})
    assert again["LD_PRELOAD"].split(":") == [allocator.library(), "libm.so.6"]
    assert allocator.environment(env)["LD_PRELOAD"] == env["LD_PRELOAD"]


def test_the_system_malloc_can_be_chosen_and_a_wrong_choice_is_named(monkeypatch):
    monkeypatch.setenv(allocator.CHOICE, "system")
    plain = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    assert allocator.library() is None and allocator.environment(plain) == plain
    monkeypatch.setenv(allocator.CHOICE, "jemalloc")
    with pytest.raises(SystemExit, match="MUXTUNE_MALLOC='jemalloc': expected tcmalloc or system"):
        allocator.environment(plain)
