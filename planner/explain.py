"""The human-readable side of a plan: a comparison table (pandas) of the plan against each baseline,
and an explanation of why tasks were fused or kept apart."""

from __future__ import annotations

import pandas as pd

from muxtune.profiler.cost_model import METHOD_SHAPES

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
    shapes = sorted({METHOD_SHAPES.get(w.method, w.method) for w in works})
    methods = sorted({w.method for w in works})
    lengths = sorted(w.seq_len for w in works)
    family = (f"same method ({methods[0]})" if len(methods) == 1 else
              f"same method family ({shapes[0]})" if len(shapes) == 1 else f"methods {', '.join(methods)}")
    spread = lengths[-1] / lengths[0]
    length = (f"same length ({lengths[0]:.0f} tokens)" if spread == 1 else
              f"lengths {lengths[0]:.0f}-{lengths[-1]:.0f} tokens (within {spread:.1f}x)")
    return f"{family}; {length}"


def _why_alone(work, others) -> str:
    if not others:
        return "the only task"
    nearest = min(others, key=lambda w: abs(w.seq_len - work.seq_len))
    ratio = max(work.seq_len, nearest.seq_len) / min(work.seq_len, nearest.seq_len)
    if ratio >= 2:
        side = "longer" if work.seq_len > nearest.seq_len else "shorter"
        return f"its sequences are {ratio:.0f}x {side} than the nearest other task's ({nearest.name})"
    return "alone its group fills the pipeline better than fused (CostModel: fusing it raised the step time more than it added tokens)"


def explain(result, works, cluster, objective: str) -> str:
    by_name = {w.name: w for w in works}
    chosen = result.chosen
    c = chosen.candidate
    lines = [f"objective: {objective}; cluster: {cluster.devices} x {cluster.hardware} device(s), "
             f"{cluster.memory_gib:g} GiB each",
             f"plan: {len(c.instances)} backbone instance(s) of {c.layout.devices} device(s), {c.layout.label()}, "
             f"schedule {chosen.schedule}, {'chunked' if c.packed else 'padded'} alignment",
             f"predicted (simulator): {chosen.throughput:,.0f} useful tokens/s over the whole job (makespan "
             f"{chosen.makespan:,.1f} s; {chosen.steady:,.0f} tokens/s while every task is present), "
             f"peak memory {chosen.peak_memory / GIB:.2f} GiB per device"]
    for s, instance in enumerate(c.instances):
        for names in instance:
            group = [by_name[n] for n in names]
            if len(group) > 1:
                lines.append(f"instance {s}: tasks {', '.join(names)} fused: {_why_fused(group)}")
            else:
                others = [w for w in works if w.name != names[0]]
                lines.append(f"instance {s}: {names[0]} alone: {_why_alone(group[0], others)}")
        if len(instance) > 1:
            lines.append(f"instance {s}: its {len(instance)} groups share one pipeline ({chosen.schedule})")
    for b in result.baselines:
        verdict = "does not fit memory" if not b.fits else f"{b.throughput / chosen.throughput:.2f}x the plan's throughput"
        lines.append(f"baseline {b.candidate.planner}: {b.throughput:,.0f} tokens/s, makespan {b.makespan:,.1f} s, "
                     f"peak {b.peak_memory / GIB:.2f} GiB: {verdict}")
    return "\n".join(lines)
