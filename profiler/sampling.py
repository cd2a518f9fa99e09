"""How long the profiler looks at one point: timers, adaptive repeats and the time budget.

A point is repeated until the median of each timed quantity is known within a stated relative error
(`Sampling.rel_error`), at least `least` and at most `most` times; a point that runs behind the profile's
`Budget` stops at `least`, and once the whole budget is used up every point left gets one timed round.
The relative standard error of a median is estimated from the spread of the samples (1.4826 MAD is the normal-equivalent standard deviation; the median's standard error is
1.2533 sigma / sqrt(n)); every profile row reports it (column `rel_error`).

Most rows the CostModel needs are overheads: a timing with a task minus the same timing without, a few
percent of either. Those are timed in alternation and taken as the median of each round's difference
(`alternated(..., contrasts=...)`), not as a difference of two medians: the machine's speed, which moves
by 10-20% within seconds on a shared host, hits both sides of a round alike and cancels. They repeat until
that median is known within `CONTRAST_ERROR` (or `most`, or the budget's share).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, replace


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(torch.device(device))


def clock() -> float:
    """The profiler's timer: wall time (what a step takes), or with MUXTUNE_PROFILE_CLOCK=cpu this
    process's CPU time, which on a CPU shared with other jobs counts this work and not the time the
    others held the cores (a diagnostic for loaded machines: wrong for CUDA, whose work is async)."""
    return time.process_time() if os.environ.get("MUXTUNE_PROFILE_CLOCK") == "cpu" else time.perf_counter()


def median_rel_error(samples: list[float]) -> float:
    """Relative standard error of the median of `samples` (inf with fewer than 2)."""
    if len(samples) < 2:
        return math.inf
    med = statistics.median(samples)
    mad = statistics.median(abs(s - med) for s in samples)
    return 1.2533 * 1.4826 * mad / math.sqrt(len(samples)) / abs(med) if med else math.inf


def difference_rel_error(a: float, a_err: float, b: float, b_err: float) -> float:
    """Relative standard error of a - b from the parts' relative errors (independent samples)."""
    diff = a - b
    spread = math.hypot(a * a_err, b * b_err)
    return spread / abs(diff) if diff else math.inf


CONTRAST_ERROR = 0.1  # an overhead (a difference of timings) is known within this, or repeats run on to `most`


class Budget:
    """The profile's time budget, spent point by point in proportion to each point's estimated cost:
    a point that started after its share of the budget has been used runs `least` repeats only."""

    def __init__(self, seconds: float, estimate: float):
        self.seconds, self.estimate = seconds, max(estimate, 1e-9)
        self.start = time.perf_counter()
        self.planned = 0.0  # estimated seconds of the points started so far
        self.allowed_until = self.start

    def begin(self, cost: float) -> None:
        self.planned += cost
        self.allowed_until = self.start + self.seconds * min(1.0, self.planned / self.estimate)

    def behind(self) -> bool:
        return time.perf_counter() > self.allowed_until

    def spent(self) -> bool:
        """The whole budget is used up (the estimate was short: a slower machine than the pilot said)."""
        return time.perf_counter() >= self.start + self.seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


@dataclass(frozen=True)
class Sampling:
    warmup: int = 2
    least: int = 3
    most: int = 7
    rel_error: float = 0.02  # stop once every timed quantity's median is known within this
    budget: Budget | None = None

    def times(self, k: int) -> Sampling:
        """k times the repeats (a quantity that is a difference of several timings needs them)."""
        return replace(self, least=self.least * k, most=self.most * k)

    def enough(self, *series: list[float], contrasts: tuple[list[float], ...] = ()) -> bool:
        n = len(series[0])
        if n >= 1 and self.budget is not None and self.budget.spent():
            return True  # past the whole budget, each point left gets one timed round, not `least`
        if n < self.least:
            return False
        if n >= self.most or (self.budget is not None and self.budget.behind()):
            return True
        return (all(median_rel_error(s) <= self.rel_error for s in series)
                and all(median_rel_error(c) <= CONTRAST_ERROR for c in contrasts))

    def repeat(self, *series: list[float], contrasts: tuple[list[float], ...] = ()):
        """Yields each round's index (warm-up rounds first: negative) until the series (each within
        rel_error) and the per-round differences `contrasts` (each within CONTRAST_ERROR) are enough."""
        for i in range(-self.warmup, 0):
            yield i
        i = 0
        while not self.enough(*series, contrasts=contrasts):
            yield i
            i += 1


@dataclass(frozen=True)
class Timed:
    """A median and its relative standard error."""

    seconds: float
    rel_error: float

    @classmethod
    def of(cls, samples: list[float]) -> Timed:
        return cls(statistics.median(samples), median_rel_error(samples))

    def __sub__(self, other: Timed) -> Timed:
        return Timed(self.seconds - other.seconds,
                     difference_rel_error(self.seconds, self.rel_error, other.seconds, other.rel_error))


def median_seconds(fn, device: str, s: Sampling) -> Timed:
    times: list[float] = []
    for i in s.repeat(times):
        sync(device)
        start = clock()
        fn()
        sync(device)
        if i >= 0:
            times.append(clock() - start)
    return Timed.of(times)


def fwd_bwd_seconds(forward, device: str, s: Sampling) -> tuple[Timed, Timed]:
    """Median forward and median backward time of `forward()` -> scalar loss (or (out, grad))."""
    fwd: list[float] = []
    bwd: list[float] = []
    for i in s.repeat(fwd, bwd):
        sync(device)
        t0 = clock()
        out = forward()
        sync(device)
        t1 = clock()
        if isinstance(out, tuple):
            out[0].backward(out[1])
        else:
            out.backward()
        sync(device)
        t2 = clock()
        if i >= 0:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
        del out
    return Timed.of(fwd), Timed.of(bwd)


def alternated(calls: list, device: str, s: Sampling, between=None,
               contrasts: list[list[float]] | None = None) -> list[tuple[Timed, Timed]]:
    """(forward, backward) of each of `calls`, timed in alternation (one of each per round) so load on
    the machine hits them alike; `between()` runs after every round. With `contrasts` (each a weight per
    call, e.g. [1, -1] for the first call's overhead over the second), (forward, backward) of each
    contrast instead: the median over rounds of that round's weighted sum (module docstring)."""
    once = Sampling(warmup=0, least=1, most=1)
    series = [([], []) for _ in calls]
    sums = [([], []) for _ in contrasts or []]
    for i in s.repeat(*(x for pair in series for x in pair), contrasts=tuple(x for pair in sums for x in pair)):
        timed = [fwd_bwd_seconds(call, device, once) for call in calls]
        if i >= 0:
            for (fs, bs), (f, b) in zip(series, timed):
                fs.append(f.seconds), bs.append(b.seconds)
            for (fs, bs), weights in zip(sums, contrasts or []):
                fs.append(sum(w * f.seconds for w, (f, _) in zip(weights, timed)))
                bs.append(sum(w * b.seconds for w, (_, b) in zip(weights, timed)))
        if between is not None:
            between()
    return [(Timed.of(fs), Timed.of(bs)) for fs, bs in (sums if contrasts else series)]
