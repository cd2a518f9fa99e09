"""Benchmarks for MuxTune: `python -m benchmarks.<name>` from the repository root, or
`python -m muxtune.benchmarks.<name>` from anywhere (the same modules, installed as muxtune.benchmarks)."""

import muxtune  # noqa: F401  first: takes the checkout root off sys.path before anything imports transformers


def announce(name: str, what: str, model: str, device: str, passes: list[tuple[float, int]],
             profile_budget: float | None = None, fixed_seconds: float = 0.0) -> float:
    """The benchmark's first line: what it measures and how long it expects to take on this machine.
    `passes`: (count, tokens) of the model's forward + backward passes it will run, priced from a pilot
    of the model here (its forward + backward at two token counts, a second or two); `profile_budget`:
    a profile it may have to measure first (when no stored one passes its calibration check)."""
    import torch

    from muxtune.executor.backbone import load_backbone
    from muxtune.profiler.profile import pilot

    probe = pilot(load_backbone(model, device=device, dtype=torch.float32).model, device)
    seconds = fixed_seconds + sum(count * probe.model(tokens) for count, tokens in passes)
    profile = f", plus up to {profile_budget / 60:.0f} min for a profile if no stored one passes its " \
              f"calibration check" if profile_budget else ""
    print(f"{name}: {what}. Expected about {max(seconds / 60, 0.1):.1f} min here{profile}.", flush=True)
    return seconds
