"""Is a stored profile this machine? A few reference ops measured now against the profile's rows.

A device name says little ("AMD EPYC" covers CPUs of very different speed; a thread count or a busier
host changes everything), so a stored profile (shipped in profiles/ or cached) is used only after a
check that takes seconds: a decoder layer's forward and backward at two points of the profile's own
grid, the LM head at one, and one optimizer step (host-bound, where the layer is compute-bound).
Each ratio is (now / stored):
  every ratio within TRUST of 1          -> trusted as it is;
  the ratios agree within UNIFORM        -> the machine is uniformly faster or slower: every time row is
                                            rescaled by the compute ops' geometric mean (memory rows are
                                            untouched);
  otherwise                              -> the profile does not describe this machine: measure anew.
The references are weighed by their share of a step: the layer and head ops are most of it and are held
to TRUST and UNIFORM; the optimizer step is a small, host-bound part (a few % of a step) whose own
timing is noisier (a profile measured 6 minutes earlier on the same quiet machine read x0.82 on it), so it
is held to the wider HOST_TRUST / HOST_UNIFORM: still enough to catch what it is there for, a thread
count or a host that moves the host-bound work apart from the compute (x2 against the layers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from muxtune.profiler.budget import NoProgress
from muxtune.profiler.sampling import Sampling, fwd_bwd_seconds

TRUST = 0.05
UNIFORM = 1.10  # largest / smallest ratio
HOST = ("optimizer",)  # host-bound references (a small share of a step): the wider bands below
HOST_TRUST = 0.25
HOST_UNIFORM = 1.30  # a host-bound ratio against the compute ops' scale, either way
SAMPLING = Sampling(warmup=2, least=5, most=30, rel_error=0.01)
NOT_TIMES = ("p2p", "allreduce")  # links between processes: not what the reference ops measure


@dataclass
class Calibration:
    ratios: dict[str, float]  # reference -> now / stored
    verdict: str  # "trusted" | "rescaled" | "remeasure"
    scale: float  # geometric mean of the ratios

    def describe(self) -> str:
        parts = ", ".join(f"{k} x{v:.2f}" for k, v in self.ratios.items())
        what = {"trusted": "agrees with this machine",
                "rescaled": f"this machine is uniformly x{self.scale:.2f}: times rescaled",
                "remeasure": "does not describe this machine: measuring anew"}[self.verdict]
        return f"calibration: {what} ({parts})"


def judge(ratios: dict[str, float]) -> Calibration:
    host = [v for k, v in ratios.items() if k.split()[0] in HOST]
    compute = [v for k, v in ratios.items() if k.split()[0] not in HOST] or host
    scale = math.exp(sum(math.log(v) for v in compute) / len(compute))
    if all(abs(v - 1) <= TRUST for v in compute) and all(abs(v - 1) <= HOST_TRUST for v in host):
        verdict = "trusted"
    elif max(compute) / min(compute) <= UNIFORM and all(max(v / scale, scale / v) <= HOST_UNIFORM for v in host):
        verdict = "rescaled"
    else:
        verdict = "remeasure"
    return Calibration(ratios, verdict, scale)


def reference_points(profile) -> list[tuple[int, int]]:
    """Two (seq_len, tokens) of the profile's layer grid, small enough to time in a second or two: the
    cheapest point of at least 256 tokens and the dearest one of at most 1024 tokens."""
    rows = profile.rows("layer", "fwd").sort_values("tokens")
    small = rows[rows["tokens"] >= 256]
    small = small if not small.empty else rows
    first = small.iloc[0]
    mid = rows[rows["tokens"] <= max(1024, int(first["tokens"]))]
    second = mid.iloc[-1]
    points = [(int(first["seq_len"]), int(first["tokens"]))]
    if (int(second["seq_len"]), int(second["tokens"])) != points[0]:
        points.append((int(second["seq_len"]), int(second["tokens"])))
    return points


def stored(profile, op: str, phase: str, **match) -> float:
    rows = profile.rows(op, phase)
    for column, value in match.items():
        rows = rows[rows[column] == value]
    if rows.empty:
        raise LookupError(f"{op} {phase} {match}")
    return float(rows["seconds"].iloc[0])


def check(profile, model, device: str) -> Calibration:
    """Measure the reference ops on `model` (the profile's backbone, loaded here) and judge."""
    from muxtune.profiler.backbone_parts import decoder_layers, head_inputs, head_loss, layer_call, synthetic_batch

    _, _, layers = decoder_layers(model)
    ratios = {}
    points = reference_points(profile)
    for seq, tokens in points:
        layer_fwd, *_ = layer_call(model, layers[0], *synthetic_batch(tokens // seq, seq, device))
        f, b = fwd_bwd_seconds(layer_fwd, device, SAMPLING)
        ratios[f"layer fwd {tokens}x{seq}"] = f.seconds / stored(profile, "layer", "fwd", tokens=tokens, seq_len=seq)
        ratios[f"layer bwd {tokens}x{seq}"] = b.seconds / stored(profile, "layer", "bwd", tokens=tokens, seq_len=seq)
    head_tokens = points[-1][1]
    hidden, targets = head_inputs(model, head_tokens, device)
    f, _ = fwd_bwd_seconds(lambda: head_loss(model, hidden.requires_grad_()[:, :-1], targets), device, SAMPLING)
    ratios[f"head fwd {head_tokens}"] = f.seconds / stored(profile, "head", "fwd", tokens=head_tokens)
    optimizer = profile.rows("optimizer", "step")
    if not optimizer.empty:
        params = int(optimizer.sort_values("params")["params"].iloc[len(optimizer) // 2])
        now = measure_optimizer_row(device, params, 4 * model.config.num_hidden_layers)
        was = stored(profile, "optimizer", "step", params=params)
        if was > 0 and now > 0:
            ratios[f"optimizer {params}"] = now / was
    return judge(ratios)


def measure_optimizer_row(device: str, params: int, tensors: int) -> float:
    """One optimizer step over `params` in `tensors` tensors, as the profile's optimizer rows measure it."""
    from muxtune.profiler.measure import measure_optimizer

    return measure_optimizer(device, [params], tensors, SAMPLING, NoProgress())[0]["seconds"]


def rescaled(profile, calibration: Calibration):
    """A copy of `profile` with every time row multiplied by the calibration's scale."""
    from muxtune.profiler.profile_file import Profile

    table = profile.table.copy()
    times = ~table["op"].isin(NOT_TIMES)
    table.loc[times, "seconds"] = table.loc[times, "seconds"] * calibration.scale
    return Profile(table, dict(profile.meta))
