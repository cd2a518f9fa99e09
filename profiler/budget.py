"""Fitting a profile into a time budget: what each point will cost, which grid fits, and the progress bar.

Before measuring, a pilot times the bare model's forward + backward at two token counts (a line in
tokens: what every point's work is made of). Each point of a grid is priced from it by what the point
runs per repeat (a decoder layer, a whole model pass, an op of every layer, a trainer step...), times its
expected repeats. If the grid does not fit the budget, it is thinned in a fixed order that keeps what the
CostModel's curves need longest: fewer repeats first, then the inner points of each curve (a quantity
linear in tokens needs its two ends; interpolation and linear extrapolation fill the rest), then the
inner sequence lengths, ranks and row counts. The points left are spent in proportion to their price
(`sampling.Budget`): a point running behind its share stops at its least repeats (one timed round on the
thinnest grid).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from muxtune.profiler.sampling import Budget
from muxtune.spec import method_card

COMM_SECONDS = 6.0  # two spawned processes and their rounds: about constant
UNCOVERED_TOKENS = 4096  # an `uncovered` row's size out of the caches (a budget's thinned grid keeps 256 only)
MIN_TARGET_TOKENS = 64  # per-op rows below this would time a call's fixed cost, not the op's work
EVAL_WARMUP = 3  # extra warm-up rounds of the no_grad forward (the `model`/`eval` row, profile.measure_backbone)


@dataclass(frozen=True)
class Pilot:
    """The bare model's forward + backward, seconds = fixed + per_token * tokens."""

    fixed: float
    per_token: float
    layers: int

    def model(self, tokens: int) -> float:
        return self.fixed + self.per_token * tokens

    def layer(self, tokens: int) -> float:
        return self.model(tokens) / (self.layers + 1)  # the head and embedding weigh about one layer


def whole_model_points(grid: dict) -> set[tuple[int, int]]:
    """The (seq_len, tokens) layer points at which the whole model is measured too (`model` rows): all of
    them, or with grid["whole_model_tokens"] = n those up to n tokens, never a step size's own point
    (`with_sizes`), and each seq_len's smallest always. A whole-model pass costs the layer's ~L+1 times
    and the CostModel needs it only for what the parts miss (a small difference, CostModel._residual):
    so a budget keeps the layer curves long and the whole model short."""
    cap = grid.get("whole_model_tokens")
    layer_only = {tuple(point) for point in grid.get("layer_only", [])}
    return {(seq, tokens) for seq, token_counts in grid["layer"].items() for tokens in token_counts
            if tokens == min(token_counts) or ((seq, tokens) not in layer_only and (cap is None or tokens <= cap))}


def with_sizes(grid: dict, sizes) -> dict:
    """`grid` plus the step sizes the tasks at hand will run, (tokens, seq_len) each: a layer curve at that
    seq_len from one row through every step's tokens, so the CostModel reads those steps where they were
    measured instead of extending a curve past its end or drawing a chord between its ends (layer rows
    only: a layer is 1/(L+1) of a model pass; the whole model at the one-row point). Inside the grid's reach
    too: a cost per token that grows with the batch (caches, attention) makes a curve convex, and a
    chord between a thinned curve's ends (256 and 4096 tokens) prices 512 tokens dear and 4096 exactly:
    8 tasks of 512 tokens then always looked cheaper fused, however much dearer fusing them measured."""
    g = copy.deepcopy(grid)
    for tokens, seq in sizes:
        had = set(g["layer"].get(seq, []))
        g["layer"][seq] = sorted(had | {seq, tokens})
        if tokens not in had:  # a point the grid measures anyway keeps its whole-model row
            g.setdefault("layer_only", []).append([seq, tokens])
    return g


def uncovered_tokens(grid: dict, sizes=()) -> list[int]:
    """Token counts of the `uncovered` rows: the per-op rows' smallest and largest, and the largest step
    the tasks at hand run (a line in tokens, read where the steps are: out of the caches, as they run)."""
    return sorted({grid["target_tokens"][0], max(grid["target_tokens"][-1], UNCOVERED_TOKENS),
                   *([max(t for t, _ in sizes)] if sizes else [])})


def repeats_expected(grid: dict) -> float:
    return grid["warmup"] + (least_repeats(grid) + grid["repeats"]) / 2


def least_repeats(grid: dict) -> int:
    """The timed rounds a point runs at least (all it runs when behind the budget's pace)."""
    return grid.get("least", min(3, grid["repeats"]))


def point_costs(grid: dict, pilot: Pilot, targets: list[str], tp: bool) -> dict:
    """{point key: estimated seconds} for every point `run_profile` will measure with `grid`, keyed as
    the measurement functions announce them (`Progress.begin`)."""
    reps = repeats_expected(grid)
    costs = {}
    whole = whole_model_points(grid)
    for seq, token_counts in grid["layer"].items():
        for tokens in token_counts:
            # layer fwd+bwd (+ a tp shard's), stem; then the saved/peak passes once; where the whole model is
            # measured, its fwd+bwd and its forward again under no_grad (the `eval` row: a third of a pass)
            model = pilot.model(tokens) if (seq, tokens) in whole else 0.0
            per_repeat = pilot.layer(tokens) * (1.6 if tp else 1.0) + model * 1.5
            costs[("layer", seq, tokens)] = reps * per_repeat + 3 * pilot.layer(tokens) + EVAL_WARMUP * model / 3
    for tokens in sorted({t for ts in grid["layer"].values() for t in ts}):
        costs[("head", tokens)] = reps * pilot.layer(tokens)
    task_tokens = [rows * grid["task_seq"] for rows in grid["task_rows"]]
    for method, ranks in grid["ranks"].items():
        # with a task, at full depth, bare (three model passes) and one real trainer step
        costs[("shared", method)] = grid.get("difference_repeats", 3) * reps * 4 * pilot.model(task_tokens[0])
        for rank in ranks:
            for rows, tokens in zip(grid["task_rows"], task_tokens):
                costs[("task", method, rank, rows)] = reps * 4.3 * pilot.model(tokens)
    diff = grid.get("difference_repeats", 3)  # quantities that are differences of timings repeat more
    for method in [m for m in grid["ranks"] if method_card(m).targeted]:  # as measure_targets picks them
        for target in targets:  # the op names, as measure_targets announces its points
            # one op of every layer, plain and bare (and with dropout at the first rank): ~ a fifth of a
            # model pass each (measured on llama-100m: 0.15 for q_proj, 0.45 for gate_proj); plus the
            # shared rows (one task vs two, each minus the bare op)
            per_target = sum(reps * (2 * len(grid["ranks"][method]) + 1) * 0.25 * pilot.model(t)
                             for t in grid["target_tokens"])
            per_target += sum(diff * reps * 4 * 0.25 * pilot.model(t) for t in grid["target_tokens"][:2])
            costs[("target", method, target)] = per_target
    if any(method_card(m).targeted for m in grid["ranks"]):  # zero-fill + add over a few [tokens, width]
        costs[("uncovered",)] = 1.0
    for rows, tokens in zip(grid["task_rows"], task_tokens):
        costs[("step", rows)] = diff * reps * sum(1.3 * pilot.model(n * tokens) for n in (1, 2, 3, 4))
    for params in grid["params"]:
        costs[("optimizer", params)] = 2 * reps * 1e-3
    costs[("comm",)] = COMM_SECONDS
    return costs


def _ends(values: list) -> list:
    return [values[0], values[-1]] if len(values) > 2 else list(values)


def thinned(grid: dict) -> list[tuple[str, dict]]:
    """Ever thinner versions of `grid`, each with what was dropped: the order in which a budget cuts."""
    steps = []
    g = copy.deepcopy(grid)

    def step(why: str, change) -> None:
        nonlocal g
        new = copy.deepcopy(g)
        change(new)
        if new != g:
            g = new
            steps.append((why, copy.deepcopy(g)))

    # the whole model's rows price only what the measured parts miss (CostModel._residual): at small
    # sizes they cost little, and the layer curves keep their largest points
    step("whole model up to 1024 tokens", lambda x: x.update(whole_model_tokens=1024))
    step("fewer repeats", lambda x: x.update(repeats=max(3, (x["repeats"] + 3) // 2)))
    step("curve ends only (tokens)", lambda x: x.update(
        layer={seq: _ends(ts) for seq, ts in x["layer"].items()}, target_tokens=_ends(x["target_tokens"])))
    step("two ranks per method", lambda x: x.update(ranks={m: _ends(r) for m, r in x["ranks"].items()}))
    step("two row counts", lambda x: x.update(task_rows=_ends(x["task_rows"])))
    step("sequence-length ends only", lambda x: x.update(
        layer={seq: x["layer"][seq] for seq in _ends(sorted(x["layer"]))}))
    step("least repeats", lambda x: x.update(repeats=3, warmup=1))
    step("one rank per method", lambda x: x.update(ranks={m: r[:1] for m, r in x["ranks"].items()}))
    # per-op rows at one token count (priced proportionally in tokens, interp1 with one point)
    step("per-op rows at the smallest token count", lambda x: x.update(target_tokens=x["target_tokens"][:1]))
    step("differences of timings repeated once", lambda x: x.update(difference_repeats=1))
    for _ in range(2):  # a curve keeps two points, its largest at least twice its smallest
        step("largest task rows halved", lambda x: x.update(task_rows=_halve_top(x["task_rows"])))
    step("one row count per method (priced proportionally)", lambda x: x.update(task_rows=x["task_rows"][:1]))
    # last resort: shorter layer curves, extended linearly above. With the whole model measured at every
    # layer point, a llama-100m profile was cut this far to fit 3 minutes on a 2-core CPU and predicted a
    # 9216-token step 45% low: the layers are cheap to measure now and are cut last
    for _ in range(4):
        step("largest layer sizes halved", lambda x: x.update(layer={seq: _halve_top(ts) for seq, ts in x["layer"].items()}))
    # a slow machine (an AMD EPYC VM timed llama-100m at 6 ms per token, 2.7x an Intel one of the same
    # kind) needs more: the per-op rows (7 ops x LoRA and DoRA, ~half of the thinnest grid) on fewer
    # tokens, still above the fixed costs of a call; then two timed repeats per point. The task rows keep
    # their 2 sequences: one row count is priced proportionally, and a task's saved tensors have a part
    # that does not grow with tokens (DoRA's weight norms): from 1 sequence, DoRA's memory came out 2x
    for _ in range(2):
        step("per-op rows at half the tokens", lambda x: x.update(
            target_tokens=[max(MIN_TARGET_TOKENS, x["target_tokens"][0] // 2)]))
    step("two repeats", lambda x: x.update(repeats=2))
    # the estimate runs short on such a machine (an llama-100m profile took 1.2x its estimate): a point
    # that falls behind the budget's pace then stops after ONE timed round
    step("one timed round where behind", lambda x: x.update(least=1))
    return steps


def _halve_top(values: list) -> list:
    if len(values) < 2:
        return list(values)
    top = max(values[-1] // 2, 2 * values[0])
    return values[:-1] + [top] if top < values[-1] else list(values)



def fit(grid: dict, budget: float | None, pilot: Pilot, targets: list[str], tp: bool,
        sizes=()) -> tuple[dict, dict, list[str]]:
    """(grid, point costs, what was cut): the richest of `thinned(grid)` whose estimate fits 85% of the
    budget (the estimate's margin), else the thinnest; the step `sizes` (`with_sizes`) are never cut."""
    def priced(candidate: dict) -> tuple[dict, dict]:
        candidate = with_sizes(candidate, sizes)
        return candidate, point_costs(candidate, pilot, targets, tp)

    fitted, costs = priced(grid)
    if budget is None or sum(costs.values()) <= 0.85 * budget:
        return fitted, costs, []
    cuts = []
    for why, candidate in thinned(grid):
        fitted, costs = priced(candidate)
        cuts.append(why)
        if sum(costs.values()) <= 0.85 * budget:
            break
    else:  # even the thinnest grid: say so rather than pretend
        cuts.append(f"still estimated at {sum(costs.values()):.0f} s: the thinnest grid, over the budget")
    return fitted, costs, cuts


class Progress:
    """The progress bar, in estimated seconds (its ETA is the profile's), and the budget's bookkeeping:
    each measurement announces its point (`begin(key)`) and its end (`end()`)."""

    def __init__(self, costs: dict, budget: float | None, desc: str, enabled: bool):
        self.costs = costs
        total = sum(costs.values())
        self.budget = Budget(budget, total) if budget else None
        self.bar = tqdm(total=round(total, 1), desc=desc, unit="s", disable=not enabled,
                        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} est. s [{elapsed}<{remaining}]")
        self.current = 0.0
        self.spent: dict[str, list[float]] = {}  # kind of point -> [estimated, measured seconds]
        self._key, self._started = None, 0.0

    def begin(self, key) -> None:
        if key not in self.costs:  # a point the budget did not plan: it would run unpaced and unshown
            raise KeyError(f"profile point {key!r} has no estimated cost (budget.point_costs keys it otherwise)")
        self.current = self.costs[key]
        self._key, self._started = key, time.perf_counter()
        if self.budget is not None:
            self.budget.begin(self.current)

    def end(self) -> None:
        self.bar.update(round(self.current, 3))
        if self._key is not None:  # where the estimate was short or long, by kind (the profile's header)
            kind = self.spent.setdefault(self._key[0], [0.0, 0.0])
            kind[0] += self.current
            kind[1] += time.perf_counter() - self._started
        self.current, self._key = 0.0, None

    def close(self) -> None:
        self.bar.close()


class NoProgress:
    """For a measurement outside a profile run (a calibration check): no bar, no budget."""

    def begin(self, key) -> None:
        pass

    def end(self) -> None:
        pass
