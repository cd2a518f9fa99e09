"""The human-readable side of a plan: a comparison table (pandas) of the plan against each baseline,
and an explanation of why tasks were fused or kept apart."""

from __future__ import annotations

import pandas as pd

from muxtune.spec import method_card

GIB = 2**30


def _row(name: str, evaluation) -> dict:
    c = evaluation.candidate
    return {"planner": name, "instances": len(c.instances), "layout": c.layout.label(),
            "groups": sum(len(i) for i in c.instances), "schedule": evaluation.schedule,
            "alignment": "chunked" if c.packed else "padded", "tokens_per_s": evaluation.throughput,
            "steady_tokens_per_s": evaluation.steady, "makespan_s": evaluation.makespan, "peak_memory_gib": evaluation.peak_memory / GIB,
            "fits_memory": evaluation.fits}


def comparison_table(result, memory_bytes: int) -> pd.DataFrame:
    table = pd.DataFrame([_row("muxtune", result.chosen)] + [_row(b.candidate.planner, b) for b in result.baselines])
    table["vs_muxtune"] = table["tokens_per_s"] / result.chosen.throughput
    return table


def _why_fused(works) -> str:
    shapes = sorted({method_card(w.method).shape for w in works})
    methods = sorted({w.method for w in works})
    lengths = sorted(w.seq_len for w in works)
    family = (f"same method ({methods[0]})" if len(methods) == 1 else
              f"same method family ({shapes[0]})" if len(shapes) == 1 else f"methods {', '.join(methods)}")
    spread = lengths[-1] / lengths[0]
    length = (f"same length ({lengths[0]:.0f} tokens)" if spread == 1 else
              f"lengths {lengths[0]:.0f}-{lengths[-1]:.0f} tokens (within {spread:.1f}x)")
    return f"{family}; {length}"


def _why_alone(work, others, shares_instance: bool) -> str:
    if not others:
        return "the only task"
    nearest = min(others, key=lambda w: abs(w.seq_len - work.seq_len))
    ratio = max(work.seq_len, nearest.seq_len) / min(work.seq_len, nearest.seq_len)
    if ratio >= 2:
        side = "longer" if work.seq_len > nearest.seq_len else "shorter"
        return f"its sequences are {ratio:.0f}x {side} than the nearest other task's ({nearest.name})"
    if shares_instance:
        return ("its own group, run in turn with the instance's other groups in each step (CostModel: fused "
                "with one of them, the step would take longer)")
    return "an instance of its own (CostModel: fused with other tasks, they would all finish later)"


def _gib(b: float) -> str:
    return f"{b / GIB:.3g} GiB"


def explain(result, works, cluster, objective: str) -> str:
    """Lines of plain text: the plan, the prediction, each group and why, each baseline against the plan."""
    by_name = {w.name: w for w in works}
    chosen = result.chosen
    c = chosen.candidate
    used = len(c.instances) * c.layout.devices
    what = ("whole-job throughput (useful tokens of every task's steps / makespan)" if objective == "throughput"
            else "steady-state throughput (every task present)")
    hardware = "this machine's device" if cluster.hardware == "this" else cluster.hardware
    lines = [f"objective: {what}; cluster: {cluster.devices} x {hardware}, {cluster.memory_gib:.1f} GiB each",
             f"plan: {len(c.instances)} backbone instance(s) of {c.layout.devices} device(s) each ({c.layout.label()}), "
             f"schedule {chosen.schedule}, {'chunked' if c.packed else 'padded'} alignment",
             f"predicted (simulator): {chosen.throughput:,.0f} useful tokens/s over the whole job, which takes "
             f"{chosen.makespan:.3g} s ({chosen.steady:,.0f} tokens/s while every task is present); peak memory "
             f"{_gib(chosen.peak_memory)} per device"]
    if used < cluster.devices:
        lines.append(f"uses {used} of the {cluster.devices} devices: the search found no faster layout that "
                     f"also uses the other {cluster.devices - used}")
    for s, instance in enumerate(c.instances):
        for names in instance:
            group = [by_name[n] for n in names]
            if len(group) > 1:
                lines.append(f"instance {s}: tasks {', '.join(names)} fused: {_why_fused(group)}")
            else:
                others = [w for w in works if w.name != names[0]]
                lines.append(f"instance {s}: {names[0]} alone: {_why_alone(group[0], others, len(instance) > 1)}")
        if len(instance) > 1:
            lines.append(f"instance {s}: its {len(instance)} groups take turns in each step "
                         f"({'interleaved in one pipeline' if chosen.schedule == 'interleaved' else chosen.schedule})")
    for b in result.baselines:
        verdict = "does not fit memory" if not b.fits else f"{b.throughput / chosen.throughput:.2f}x the plan's throughput"
        lines.append(f"baseline {b.candidate.planner}: {b.throughput:,.0f} tokens/s, job {b.makespan:.3g} s, "
                     f"peak {_gib(b.peak_memory)}: {verdict}")
    return "\n".join(lines)
