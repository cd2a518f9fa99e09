"""Benchmarks for MuxTune: `python -m benchmarks.<name>` from the repository root, or
`python -m muxtune.benchmarks.<name>` from anywhere (the same modules, installed as muxtune.benchmarks)."""

import functools

import muxtune  # noqa: F401  first: takes the checkout root off sys.path before anything imports transformers

# What a benchmark's defaults may take on a 2-core CPU of our kind, any profile it must measure first
# included (issue 19: 20 minutes), less a margin for what the pilot's pricing misses. Machines of the
# same kind differ ~3x (llama-100m at 2.2 ms per token on an Intel Xeon VM, 6 ms on an AMD EPYC one),
# so a benchmark whose workload is counted in steps takes fewer of them where they are slow.
DEFAULT_LIMIT_SECONDS = 0.85 * 20 * 60


@functools.lru_cache(maxsize=None)
def _pilot(model: str, device: str):
    import torch

    from muxtune.executor.backbone import load_backbone
    from muxtune.profiler.profile import pilot

    return pilot(load_backbone(model, device=device, dtype=torch.float32).model, device)


def expected_seconds(model: str, device: str, passes: list[tuple[float, int]], fixed_seconds: float = 0.0) -> float:
    """`passes`: (count, tokens) of the model's forward + backward passes a run makes, priced from a pilot
    of the model here (its forward + backward at two token counts, a second or two)."""
    probe = _pilot(model, device)
    return fixed_seconds + sum(count * probe.model(tokens) for count, tokens in passes)


def default_steps(requested: int | None, default: int, least: int, seconds_for, reserved: float = 0.0) -> int:
    """`requested` when the user gave it; else `default`, or fewer (never below `least`) where this machine
    is too slow for `default` steps to finish within DEFAULT_LIMIT_SECONDS: `seconds_for(n)` is the run's
    expected seconds with n steps, `reserved` what it may spend besides (a profile's budget)."""
    if requested is not None:
        return requested
    steps = default
    while steps > least and seconds_for(steps) + reserved > DEFAULT_LIMIT_SECONDS:
        steps -= 1
    if steps < default:
        print(f"(this machine: {steps} steps instead of the default {default}, to finish within "
              f"{DEFAULT_LIMIT_SECONDS / 60:.0f} min; --steps sets them)", flush=True)
    return steps


def announce(name: str, what: str, model: str, device: str, passes: list[tuple[float, int]],
             profile_budget: float | None = None, fixed_seconds: float = 0.0) -> float:
    """The benchmark's first line: what it measures and how long it expects to take on this machine;
    `profile_budget`: a profile it may have to measure first (when no stored one passes its calibration
    check)."""
    seconds = expected_seconds(model, device, passes, fixed_seconds)
    profile = f", plus up to {profile_budget / 60:.0f} min for a profile if no stored one passes its " \
              f"calibration check" if profile_budget else ""
    print(f"{name}: {what}. Expected about {max(seconds / 60, 0.1):.1f} min here{profile}.", flush=True)
    return seconds
