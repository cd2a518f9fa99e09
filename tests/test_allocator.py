"""The processes that train run on tcmalloc where it is installed (muxtune/allocator.py): glibc's malloc
keeps what a step frees, so a process's memory would not be the tensors' memory that admission prices."""

import os
import subprocess
import sys

import pytest

from muxtune import allocator

MALLOC_OF_CHILD = "from muxtune import allocator; print(allocator.in_use())"


def plain_env() -> dict:
    """This process's environment without a preload (and without the re-exec mark)."""
    return {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MUXTUNE_MALLOC_REEXEC")}


def child_malloc(env: dict) -> str:
    done = subprocess.run([sys.executable, "-P", "-c", MALLOC_OF_CHILD], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_child_started_with_the_environment_runs_on_tcmalloc_where_installed(monkeypatch):
    monkeypatch.delenv(allocator.CHOICE, raising=False)
    plain = plain_env()
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
    plain = plain_env()
    assert allocator.library() is None and allocator.environment(plain) == plain
    monkeypatch.setenv(allocator.CHOICE, "jemalloc")
    with pytest.raises(SystemExit, match="MUXTUNE_MALLOC='jemalloc': expected tcmalloc or system"):
        allocator.environment(plain)


def test_a_command_line_starts_itself_again_on_tcmalloc_once(monkeypatch):
    monkeypatch.delenv(allocator.CHOICE, raising=False)
    plain = plain_env()
    code = ("import os; from muxtune import allocator; print('start', flush=True); allocator.reexec(); "
            "print(allocator.in_use(), os.environ.get('MUXTUNE_MALLOC_REEXEC'))")
    done = subprocess.run([sys.executable, "-P", "-c", code], env=plain, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    if allocator.library() is None:
        assert done.stdout.split("\n")[:2] == ["start", "system None"]
        return
    # the same command line ran twice: once on glibc's malloc, then (exec) on tcmalloc, and stopped there
    assert done.stdout.split("\n")[:3] == ["start", "start", "tcmalloc 1"]
    # once only: where the preload did not take (here: marked as already tried), it goes on as it is
    done = subprocess.run([sys.executable, "-P", "-c", code], env={**plain, "MUXTUNE_MALLOC_REEXEC": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.split("\n")[:2] == ["start", "system 1"]
