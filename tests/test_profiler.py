"""Profiler and CostModel: interpolation, composition, the analytic model, fingerprint caching, a quick
profile run on the real executor, and the CLI (the accuracy benchmark's smoke run is in
test_benchmarks_smoke.py)."""


import numpy as np
import pandas as pd
import pytest
import torch
from muxtune.profiler import profile as prof
from muxtune.profiler.cost_model import (
    CostModel,
    MicroBatch,
    ModelShape,
    TaskLoad,
    interp1,
    interp_grid,
)

from muxtune.errors import MuxTuneError

LLAMA_OPS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # a layer's targets

SHAPE = ModelShape(n_layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=260, dtype_bytes=4)


# --- interpolation -----------------------------------------------------------------------------------


def test_interp1_is_piecewise_linear_and_extends_the_end_segments():
    xs, ys = [10, 20, 40], [1.0, 3.0, 4.0]
    assert interp1(xs, ys, 15) == pytest.approx(2.0)
    assert interp1(xs, ys, 30) == pytest.approx(3.5)
    assert interp1(xs, ys, 80) == pytest.approx(6.0)  # slope of the last segment (1/20)
    assert interp1(xs, ys, 5) == pytest.approx(0.0)  # slope of the first segment (1/5)
    assert interp1([8], [2.0], 16) == pytest.approx(4.0)  # one point: proportional


def test_grid_interpolation_is_exact_for_the_layer_cost_form():
    """a + b*T + c*T*S, measured on a ragged grid, is reproduced at points that were not measured."""
    cost = lambda t, s: 1e-4 + 2e-6 * t + 3e-9 * t * s
    grid = {16: [64, 256], 64: [64, 256, 1024], 256: [256, 1024]}
    table = pd.DataFrame([{"tokens": t, "seq_len": s, "seconds": cost(t, s)} for s, ts in grid.items() for t in ts])
    for t, s in [(100, 16), (777, 40), (2000, 300), (300, 128)]:
        assert interp_grid(table, "tokens", "seq_len", "seconds", t, s) == pytest.approx(cost(t, s), rel=1e-9)


# --- the profile-based cost model on a synthetic profile with known costs ----------------------------

LAYER = lambda t, s, ph: (1e-4 + 2e-6 * t + 3e-9 * t * s) * (2 if ph == "bwd" else 1)
MODEL_EXTRA = 5e-4  # what the whole model costs beyond its measured parts
SKIP = {"lora": lambda t: 1e-5 + 1e-8 * t, "ia3": lambda t: 2e-5 + 2e-8 * t}  # backward below the method
SKIP_BYTES = {"lora": 30, "ia3": 20}
SHARED = {"fwd": 3e-5, "bwd": 1e-5}
TASK = {"lora": lambda t, r, ph: 1e-4 + 1e-8 * t * r, "ia3": lambda t, r, ph: 5e-5 + 1e-8 * t}


def synthetic_profile(device="cpu", device_name="Test CPU") -> prof.Profile:
    rows = []
    for s, ts in {32: [64, 256, 1024], 128: [128, 512, 2048]}.items():
        for t in ts:
            stem, head = 1e-5 * t / 64, 4e-7 * t
            for ph in ("fwd", "bwd"):
                rows.append(prof._row("layer", ph, LAYER(t, s, ph), t, s, saved=1000 * t))
                whole = SHAPE.n_layers * LAYER(t, s, ph) + (stem if ph == "fwd" else 0) + head + MODEL_EXTRA
                rows.append(prof._row("model", ph, whole, t, s))
            rows.append(prof._row("stem", "fwd", stem, t, s))
    for t in (64, 128, 256, 512, 1024, 2048):
        rows += [prof._row("head", ph, 4e-7 * t, t, peak=t * 1040) for ph in ("fwd", "bwd")]
    for method, ranks in {"lora": [4, 32], "ia3": [0]}.items():
        for r in ranks:
            for t in (64, 256):
                for ph in ("fwd", "bwd"):
                    rows.append(prof._row("task", ph, TASK[method](t, r, ph), t, 32, method, r, 100, saved=10 * t,
                                          batch=8 * t if ph == "fwd" else 0))
                rows.append(prof._row("task", "skip", SKIP[method](t), t, 32, method, r, 100, saved=SKIP_BYTES[method] * t))
                if method == "lora":  # the rest of a real step: optimizer at 100 params + 2e-4 s of host work
                    rows.append(prof._row("task", "step", 1e-4 + 1e-9 * 100 + 2e-4, t, 32, method, r, 100))
    # what a second LoRA task shares with the first (one split/cat per wrapped op)
    rows += [prof._row("task", f"{ph}_shared", SHARED[ph], 64, 32, "lora", 4) for ph in ("fwd", "bwd")]
    rows += [prof._row("optimizer", "step", 1e-4 + 1e-9 * p, params=p) for p in (1000, 100_000)]
    rows += [prof._row(op, "comm", 2e-5 + n / 1e9, nbytes=n, world=2) for op in ("p2p", "allreduce")
             for n in (1000, 1_000_000)]
    fp = {"device": device, "device_name": device_name, "threads": 1, "torch": "x", "model": "m",
          "model_hash": "h", "dtype": "float32"}
    meta = {"fingerprint": fp, "mode": "quick", "shape": SHAPE.as_dict(),
            "weight_bytes": {"layer": 1000, "first": 300, "last": 200}}
    return prof.Profile(pd.DataFrame(rows, columns=prof.COLUMNS), meta)


def test_an_evaluation_is_priced_as_a_forward_without_autograd():
    """CostModel.evaluation_seconds: the bare model's forward at its `model`/`eval` rows (measured under
    no_grad) in place of the training forward's `model`/`fwd`, the adapters' forward as in training,
    the batch's host work; a profile without eval rows prices the training forward (an upper bound)."""
    older = synthetic_profile()
    a, b = TaskLoad("lora", 8, 300, 5000), TaskLoad("ia3", 0, 200, 700)
    mb, t, s = MicroBatch((a, b), 50), 500, 50
    cm = CostModel.from_profile(older)
    training = cm.forward_seconds(mb, SHAPE.n_layers, True, True)
    assert cm.evaluation_seconds([mb]) == pytest.approx(training + cm.batch_host_seconds(mb), rel=1e-9)

    whole = lambda t, s: SHAPE.n_layers * LAYER(t, s, "fwd") + 1e-5 * t / 64 + 4e-7 * t + MODEL_EXTRA
    no_grad = 0.7  # the bare forward without building the graph: 70% of the training forward here
    rows = older.table.to_dict("records")
    rows += [prof._row("model", "eval", no_grad * whole(r["tokens"], r["seq_len"]), r["tokens"], r["seq_len"])
             for r in older.rows("model", "fwd").to_dict("records")]
    cm = CostModel.from_profile(prof.Profile(pd.DataFrame(rows, columns=prof.COLUMNS), older.meta))
    forward_only = no_grad * whole(t, s) + TASK["lora"](300, 8, "fwd") + TASK["ia3"](200, 0, "fwd")
    assert cm.evaluation_seconds([mb]) == pytest.approx(forward_only + cm.batch_host_seconds(mb), rel=1e-9)
    assert cm.evaluation_seconds([mb, mb]) == pytest.approx(2 * cm.evaluation_seconds([mb]), rel=1e-12)
    assert cm.forward_seconds(mb, SHAPE.n_layers, True, True) == pytest.approx(training, rel=1e-12)  # training as before


def test_from_profile_composes_a_fused_step_from_parts_at_unmeasured_shapes():
    cm = CostModel.from_profile(synthetic_profile())
    a, b = TaskLoad("lora", 8, 300, 5000), TaskLoad("ia3", 0, 200, 700)
    mb = MicroBatch((a, b), 50)
    t, s = 500, 50
    for ph, fn in (("fwd", cm.forward_seconds), ("bwd", cm.backward_seconds)):
        # the batch's backward skips the smaller of its methods' skips, at the batch's 500 tokens
        skip = min(SKIP["lora"](t), SKIP["ia3"](t)) if ph == "bwd" else 0.0
        whole = (SHAPE.n_layers * LAYER(t, s, ph) + (1e-5 * t / 64 if ph == "fwd" else 0) + 4e-7 * t
                 + MODEL_EXTRA + TASK["lora"](300, 8, ph) + TASK["ia3"](200, 0, ph) - skip)
        assert fn(mb, SHAPE.n_layers, True, True) == pytest.approx(whole, rel=1e-9)
        # pipeline stages (first 1 layer + embedding, last 3 layers + head) add up to the single-device step
        assert fn(mb, 1, first=True) + fn(mb, 3, last=True) == pytest.approx(whole, rel=1e-9)
        assert fn(mb, 3) < fn(mb, 3, last=True)
    opt = 2e-4 + 1e-9 * 5700 + 2e-4  # two optimizer steps + the lora task's host work (ia3 has no step rows)
    assert cm.host_seconds(a) == pytest.approx(2e-4) and cm.host_seconds(b) == 0.0
    step = cm.forward_seconds(mb, 4, True, True) + cm.backward_seconds(mb, 4, True, True) + opt
    assert cm.step_seconds([mb]) == pytest.approx(step, rel=1e-9)
    assert cm.step_seconds([mb, mb]) == pytest.approx(2 * step, rel=1e-9)
    # a second LoRA task adds its own overhead but not the part LoRA tasks share
    a2 = TaskLoad("lora", 16, 100, 9000)
    mb2 = MicroBatch((a, b, a2), 50)
    for ph, fn in (("fwd", cm.forward_seconds), ("bwd", cm.backward_seconds)):
        extra = fn(mb2, 4, True, True) - fn(MicroBatch((a, b, TaskLoad("ia3", 0, 100, 0)), 50), 4, True, True)
        assert extra == pytest.approx(TASK["lora"](100, 16, ph) - TASK["ia3"](100, 0, ph) - SHARED[ph], rel=1e-6)


def test_the_whole_model_at_a_few_points_prices_what_the_parts_miss_at_any_size():
    """The whole model is the dearest row, so a budget measures it only at small sizes (budget.
    whole_model_points); the layer curves go on. Pricing takes what the parts miss at the whole model's
    points and carries that, not the whole model's own cost, past them: where the layer's cost per token
    grows at large sizes (caches; +30% here from 1024 tokens on), a step past the largest whole-model
    point is priced as with every point measured. The difference is held past its points, not extended
    by its slope (a noisy difference extended 10x past its points is 10x the noise)."""
    table = synthetic_profile().table.copy()
    big = table["tokens"] >= 1024
    layer, model = table["op"] == "layer", table["op"] == "model"
    for ph in ("fwd", "bwd"):
        bump = 0.3 * table.loc[layer & big & (table["phase"] == ph), "seconds"].to_numpy()
        table.loc[layer & big & (table["phase"] == ph), "seconds"] += bump
        table.loc[model & big & (table["phase"] == ph), "seconds"] += SHAPE.n_layers * bump
    full = prof.Profile(table, synthetic_profile().meta)
    few = prof.Profile(table[~model | (table["tokens"] <= 256)].reset_index(drop=True), full.meta)
    assert set(few.rows("model")["tokens"]) == {64, 128, 256}
    for t, s in ((2048, 128), (1024, 32)):
        mb = MicroBatch((TaskLoad("lora", 8, t, 5000),), s)
        for ph, fn in (("fwd", "forward_seconds"), ("bwd", "backward_seconds")):
            bare = (1.3 * SHAPE.n_layers * LAYER(t, s, ph) + (1e-5 * t / 64 if ph == "fwd" else 0) + 4e-7 * t
                    + MODEL_EXTRA + TASK["lora"](t, 8, ph) - (SKIP["lora"](t) if ph == "bwd" else 0.0))
            for profile in (full, few):
                assert getattr(CostModel.from_profile(profile), fn)(mb, SHAPE.n_layers, True, True) == \
                    pytest.approx(bare, rel=1e-9)
    # a noisy difference (+20% of the model at the curve's last point) is held there, not extended
    noisy = synthetic_profile().table.copy()
    last = (noisy["op"] == "model") & (noisy["tokens"] == 1024)
    noisy.loc[last, "seconds"] *= 1.2
    cm = CostModel.from_profile(prof.Profile(noisy[noisy["seq_len"] != 128].reset_index(drop=True), full.meta))
    held = cm._residual("fwd", 1024, 32)
    assert held > MODEL_EXTRA and cm._residual("fwd", 16 * 1024, 32) == pytest.approx(held, rel=1e-12)


# per targeted op (fwd/bwd) and what dropout adds there, for one task over all layers; fixed host work
TARGET = {"q_proj": lambda t, r: 2e-5 + 1e-8 * t * r, "v_proj": lambda t, r: 1e-5 + 1e-8 * t * r,
          "down_proj": lambda t, r: 4e-5 + 3e-8 * t * r}
DROPOUT = {"q_proj": lambda t: 1e-7 * t, "v_proj": lambda t: 1e-7 * t, "down_proj": lambda t: 2e-7 * t}
HOST_FIXED = lambda t: 5e-5 + 1e-7 * t


def targeted_profile() -> prof.Profile:
    """The synthetic profile plus per-target LoRA rows (bwd = 2x fwd), dropout rows at the first rank,
    and the step's fixed host work."""
    p = synthetic_profile()
    rows = []
    for target, cost in TARGET.items():
        for r in (4, 32):
            for t in (256, 1024, 4096):
                rows += [prof._row("target", ph, cost(t, r) * k, t, 32, "lora", r, target=target)
                         for ph, k in (("fwd", 1), ("bwd", 2))]
                if r == 4:
                    rows += [prof._row("target", f"dropout_{ph}", DROPOUT[target](t) * k, t, 32, "lora", r, target=target)
                             for ph, k in (("fwd", 1), ("bwd", 0.5))]
    rows += [prof._row("step", "host_fixed", HOST_FIXED(t), t, 32, "lora", 4) for t in (64, 256)]
    table = pd.concat([p.table, pd.DataFrame(rows, columns=prof.COLUMNS)], ignore_index=True)
    return prof.Profile(table, {**p.meta, "task_targets": ["q_proj", "v_proj"]})


def test_lora_is_priced_per_target_op_with_its_dropout_and_host_work_once_per_batch():
    cm, plain = CostModel.from_profile(targeted_profile()), CostModel.from_profile(synthetic_profile())
    ia3 = TaskLoad("ia3", 0, 200, 700)
    mlp = TaskLoad("lora", 8, 600, 5000, ("q_proj", "down_proj"), dropout=0.1)
    default = TaskLoad("lora", 16, 300, 9000)  # no target list: the profile's task_targets (q_proj, v_proj)
    mb = MicroBatch((mlp, default, ia3), 50)
    bare = MicroBatch((ia3,), 50)
    for ph, fn, k, kd in (("fwd", CostModel.forward_seconds, 1, 1), ("bwd", CostModel.backward_seconds, 2, 0.5)):
        skip = min(SKIP["lora"](1100), SKIP["ia3"](1100)) if ph == "bwd" else 0.0
        # the backbone at the batch's 1100 tokens with the IA3 task's own 200, skipping what LoRA allows
        base = (fn(plain, MicroBatch((TaskLoad("ia3", 0, 1100, 0),), 50), 4, True, True) + TASK["ia3"](200, 0, ph)
                - TASK["ia3"](1100, 0, ph) + (SKIP["ia3"](1100) if ph == "bwd" else 0.0) - skip)
        # the sum over its ops, dropout on each; nothing shared between target-priced tasks
        adapters = k * (TARGET["q_proj"](600, 8) + TARGET["down_proj"](600, 8)) + kd * (
            DROPOUT["q_proj"](600) + DROPOUT["down_proj"](600)) + k * (TARGET["q_proj"](300, 16) + TARGET["v_proj"](300, 16))
        assert fn(cm, mb, 4, True, True) == pytest.approx(base + adapters, rel=1e-9)
        assert fn(cm, bare, 4, True, True) == pytest.approx(fn(plain, bare, 4, True, True), rel=1e-12)
    # a dotted target is priced as its op name; an op that was not profiled is an error naming it
    dotted = MicroBatch((TaskLoad("lora", 8, 600, 5000, ("mlp.down_proj", "self_attn.q_proj"), 0.1), default, ia3), 50)
    assert cm.forward_seconds(dotted, 4, True, True) == pytest.approx(cm.forward_seconds(mb, 4, True, True))
    with pytest.raises(MuxTuneError, match="lora was not profiled on target 'gate_proj'"):
        cm.forward_seconds(MicroBatch((TaskLoad("lora", 8, 64, 10, ("gate_proj",)),), 32), 1)
    # host: the step's fixed part once per batch, each task's step rows less the optimizer and that part;
    # interpolated inside the measured tokens (64..256), held past them (host work is nearly flat in tokens)
    assert cm.batch_host_seconds(MicroBatch((TaskLoad("lora", 8, 100, 5000),), 50)) == pytest.approx(HOST_FIXED(100))
    assert cm.batch_host_seconds(mb) == pytest.approx(HOST_FIXED(256))
    assert cm.host_seconds(default) == pytest.approx(2e-4 - HOST_FIXED(256))
    terms = cm.step_breakdown(mb)
    assert sum(terms.values()) == pytest.approx(cm.step_seconds([mb]), rel=1e-12)
    assert terms["host_batch"] + terms["host_tasks"] == pytest.approx(
        HOST_FIXED(256) + 2e-4 - HOST_FIXED(256) + 2e-4 - HOST_FIXED(256))
    assert terms["fwd_backbone"] + terms["fwd_head"] + terms["fwd_tasks"] == pytest.approx(
        cm.forward_seconds(mb, 4, True, True), rel=1e-12)


def test_the_trainers_per_forward_work_is_priced_once_per_batch():
    """Method-level task rows hold the trainer's own per-forward work (routing, per-task losses) once
    per method, op-level target rows not at all; it is the difference of the two for LoRA on the
    default targets where both were measured (rank 4, 256 tokens) and a batch pays it once."""
    cm, plain = CostModel.from_profile(targeted_profile()), CostModel.from_profile(synthetic_profile())
    ia3 = TaskLoad("ia3", 0, 200, 700)
    lora = TaskLoad("lora", 8, 600, 5000, ("q_proj", "down_proj"))
    for ph, fn, k in (("fwd", CostModel.forward_seconds, 1), ("bwd", CostModel.backward_seconds, 2)):
        overhead = TASK["lora"](256, 4, ph) - k * (TARGET["q_proj"](256, 4) + TARGET["v_proj"](256, 4))
        assert cm._batch_overhead(ph) == pytest.approx(overhead)
        # LoRA alone (target rows only): its ops plus the batch's overhead once
        skip = SKIP["lora"](600) if ph == "bwd" else 0.0
        base = fn(plain, MicroBatch((TaskLoad("ia3", 0, 600, 0),), 50), 4, True, True) - TASK["ia3"](600, 0, ph) + (
            SKIP["ia3"](600) if ph == "bwd" else 0.0) - skip
        adapters = k * (TARGET["q_proj"](600, 8) + TARGET["down_proj"](600, 8))
        assert fn(cm, MicroBatch((lora,), 50), 4, True, True) == pytest.approx(base + adapters + overhead, rel=1e-9)
        # with an IA3 task (one method priced by method rows): its rows already hold the overhead once
        without = CostModel.from_profile(targeted_profile())
        without._batch_overhead = lambda phase: 0.0
        for mb, times in ((MicroBatch((lora,), 50), 1), (MicroBatch((lora, ia3), 50), 0), (MicroBatch((ia3,), 50), 0)):
            assert fn(cm, mb, 4, True, True) - fn(without, mb, 4, True, True) == pytest.approx(times * overhead)


def test_lora_tasks_on_the_same_op_share_its_node_once():
    """Each target-priced task is measured alone on its ops; a second LoRA task on an op does not add
    that op's shared part again (rows target/shared_*, held at the ends of their token range)."""
    p = targeted_profile()
    shared = {"q_proj": 3e-5, "v_proj": 2e-5, "down_proj": 1e-5}
    rows = [prof._row("target", f"shared_{ph}", cost * k, t, 32, "lora", 4, target=name)
            for name, cost in shared.items() for t in (256, 1024) for ph, k in (("fwd", 1), ("bwd", 0.5))]
    cm = CostModel.from_profile(prof.Profile(pd.concat([p.table, pd.DataFrame(rows, columns=prof.COLUMNS)],
                                                       ignore_index=True), p.meta))
    alone = CostModel.from_profile(p)
    mlp = TaskLoad("lora", 8, 600, 5000, ("q_proj", "down_proj"), dropout=0.1)
    default = TaskLoad("lora", 16, 300, 9000)  # q_proj, v_proj: shares q_proj with `mlp`
    third = TaskLoad("lora", 4, 2000, 900, ("q_proj", "v_proj", "down_proj"))
    for fn, k in ((CostModel.forward_seconds, 1), (CostModel.backward_seconds, 0.5)):
        two = MicroBatch((mlp, default), 50)
        assert fn(alone, two, 4, True, True) - fn(cm, two, 4, True, True) == pytest.approx(k * shared["q_proj"])
        three = MicroBatch((mlp, default, third), 50)
        saved = k * (2 * shared["q_proj"] + shared["v_proj"] + shared["down_proj"])
        assert fn(alone, three, 4, True, True) - fn(cm, three, 4, True, True) == pytest.approx(saved)
        # one task alone shares nothing; tasks on different ops share nothing
        for mb in (MicroBatch((mlp,), 50), MicroBatch((TaskLoad("lora", 8, 600, 5000, ("down_proj",)),
                                                       TaskLoad("lora", 8, 600, 5000, ("v_proj",))), 50)):
            assert fn(cm, mb, 4, True, True) == pytest.approx(fn(alone, mb, 4, True, True), rel=1e-12)


def test_methods_of_one_shape_keep_the_same_backbone_tensors_alive_once():
    """LoRA and DoRA (both 'parallel') keep the same op inputs alive: counted once; IA3 ('scaling')
    keeps other tensors: counted on its own. What each adapter makes itself counts per method."""
    from muxtune.executor.peft import METHODS
    from muxtune.spec import method_card

    assert {name: method_card(name).shape for name in METHODS} == {name: m.SHAPE for name, m in METHODS.items()}
    p = synthetic_profile()
    lora = p.table[p.table["method"] == "lora"]
    p = prof.Profile(pd.concat([p.table, lora.assign(method="dora")], ignore_index=True), p.meta)
    cm = CostModel.from_profile(p)
    T, layers = 300, 4 * 1000 * 300
    one = lambda *methods: MicroBatch(tuple(TaskLoad(m, 8, T // len(methods), 10) for m in methods), 50)
    assert cm.activation_bytes(one("lora"), 4) == pytest.approx(layers + 10 * T, rel=1e-6)
    assert cm.activation_bytes(one("lora", "dora"), 4) == pytest.approx(layers + 2 * 2 * T + 8 * T, rel=1e-6)
    assert cm.activation_bytes(one("lora", "ia3"), 4) == pytest.approx(layers + 2 * 10 * T, rel=1e-6)


def test_tensor_parallel_pricing_by_hand():
    """tp=2: a rank's layers from the profile's tp_layer rows (else the whole layer / tp), stem, head, what
    the parts miss and the adapters whole; the all-reduces the executor issues, each of tokens x hidden x
    dtype bytes at the profile's all-reduce price; weights: the layer shard + whole norms + the embedding
    and head whole; adapter parameters: A of a column op and B of a row op (r x hidden) whole."""
    profile = synthetic_profile()
    cm = CostModel.from_profile(profile)
    mb = MicroBatch((TaskLoad("lora", 8, 300, 5000, ("q_proj", "v_proj")),), 40)
    for phase, fn in (("fwd", cm.forward_seconds), ("bwd", cm.backward_seconds)):
        whole, half = cm._stage_parts(mb, 4, True, True, phase), cm._stage_parts(mb, 4, True, True, phase, tp=2)
        assert half["head"] == whole["head"] and half["tasks"] == whole["tasks"]
        layer = LAYER(300, 40, phase)
        assert whole["backbone"] - half["backbone"] == pytest.approx(4 * layer / 2)  # no tp rows: layer / tp
        assert fn(mb, 4, True, True, tp=2) == pytest.approx(sum(half.values()))
    shard_rows = [prof._row("tp_layer", ph, 0.3 * LAYER(t, s, ph), t, s, world=2, saved=700 * t)
                  for s, ts in {32: [64, 256, 1024], 128: [128, 512, 2048]}.items() for t in ts for ph in ("fwd", "bwd")]
    measured = CostModel.from_profile(prof.Profile(pd.concat([profile.table, pd.DataFrame(shard_rows, columns=prof.COLUMNS)]),
                                                   profile.meta))
    for phase in ("fwd", "bwd"):
        assert measured.tp_layer_seconds(mb, phase, 2) == pytest.approx(0.3 * LAYER(300, 40, phase))
        assert measured.tp_layer_seconds(mb, phase, 4) == pytest.approx(LAYER(300, 40, phase) / 4)  # not measured
    skip_saved = measured.activation_bytes(mb, 4) - 4 * 1000 * 300
    assert measured.activation_bytes(mb, 4, tp=2) == pytest.approx(4 * 700 * 300 + skip_saved, abs=1)
    # collectives: 2 per layer forward; backward 5 per layer but the first stage's first layer's q/k/v
    assert cm.tp_allreduce_bytes(mb) == 300 * 64 * 4
    assert cm.tp_allreduce_seconds(mb, 2) == pytest.approx(2e-5 + 300 * 64 * 4 / 1e9)
    assert cm.tp_collectives(mb, 3, True, "fwd") == [1, 1] * 3
    assert cm.tp_collectives(mb, 3, False, "bwd") == [2, 3] * 3
    assert cm.tp_collectives(mb, 3, True, "bwd") == [2, 3, 2, 3, 2, 0]
    mlp_only = MicroBatch((TaskLoad("lora", 8, 300, 5000, ("down_proj",)),), 40)
    assert cm.tp_collectives(mlp_only, 3, True, "bwd") == [2, 3, 2, 3, 0, 0]
    # memory: layer 1000 bytes of which the norms 2 x 64 x 4 stay whole; embedding 300 and head 200 whole
    assert cm.backbone_bytes(4, True, True, tp=2) == int(4 * ((1000 - 512) / 2 + 512) + 300 + 200)
    # LoRA on q (64 -> 64) and v (64 -> 32): r x (128 + 96) parameters a layer, r x 64 x 2 replicated
    assert cm.tp_replicated_share(("q_proj", "v_proj")) == pytest.approx(128 / 224)
    assert cm.tp_params(2240, ("q_proj", "v_proj"), 2) == (1280 + 480, 1280)
    assert cm.tp_params(2240, ("q_proj",), 1) == (2240, 0)


def test_tensor_parallel_support_and_the_analytic_shard():
    cm = CostModel.analytic("h100", SHAPE)
    assert cm.tp_refusal(1, {"ia3"}) is None and cm.tp_refusal(2, {"lora"}) is None
    assert "only LoRA" in cm.tp_refusal(2, {"lora", "ia3"})
    assert "kv_heads=2" in cm.tp_refusal(4, {"lora"})
    gpt2 = CostModel.analytic("h100", ModelShape(n_layers=2, hidden=64, intermediate=256, heads=4, kv_heads=4,
                                                 vocab=260, dtype_bytes=4, gated_mlp=False))
    assert "LLaMA" in gpt2.tp_refusal(2, {"lora"})
    assert cm.tp_fast_link() and not CostModel.analytic("l4", SHAPE).tp_fast_link()
    assert not CostModel.from_profile(synthetic_profile()).tp_fast_link()  # CPU processes over gloo
    big = CostModel.analytic("h100", ModelShape(n_layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32,
                                                vocab=32000, dtype_bytes=2))
    mb = MicroBatch((TaskLoad("lora", 8, 8192, 10**6),), 1024)
    whole, half = big._analytic_layer(mb, "fwd"), big._analytic_layer(mb, "fwd", 2)
    assert whole / 2 < half < whole * 0.6  # compute-bound GEMMs halve; launches and norms do not
    # all-reduce over NVLink: (w - 1) x one link transfer of 2n / w bytes
    assert big.tp_allreduce_seconds(mb, 2) == pytest.approx(10e-6 + 8192 * 4096 * 2 / 450e9)


def test_from_profile_links_memory_and_errors():
    cm = CostModel.from_profile(synthetic_profile())
    mb = MicroBatch((TaskLoad("lora", 8, 300, 5000),), 50)
    assert cm.p2p_seconds(500_000) == pytest.approx(2e-5 + 5e-4)
    assert cm.allreduce_seconds(4_000_000, 4) == pytest.approx(3 * (2e-5 + 2e-3))  # (w-1) * t2(2n/w)
    assert cm.allreduce_seconds(10, 1) == 0.0
    assert cm.backbone_bytes(4, True, True) == 4500 and cm.backbone_bytes(2) == 2000
    assert cm.task_state_bytes(5000) == 16 * 5000
    assert cm.boundary_bytes(mb) == 300 * 64 * 4
    # layers' saved tensors (1000 B/token) + the task's own (10 B/token over the whole model)
    assert cm.activation_bytes(mb, 4) == pytest.approx(4 * 1000 * 300 + 10 * 300, rel=1e-6)
    assert cm.step_memory_bytes([mb]) == cm.activation_bytes(mb, 4) + 300 * 1040 - 30 * 300 + 4 * 5000
    with pytest.raises(MuxTuneError, match="'prefix' was not profiled"):
        cm.step_seconds([MicroBatch((TaskLoad("prefix", 8, 64, 10),), 32)])
    with pytest.raises(MuxTuneError, match="unknown method"):
        cm.forward_seconds(MicroBatch((TaskLoad("magic", 8, 64, 10),), 32), 1)


# --- analytic model ----------------------------------------------------------------------------------


def test_analytic_model_orders_hardware_and_hits_the_compute_roof():
    big = ModelShape(n_layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000, dtype_bytes=2)
    mb = MicroBatch((TaskLoad("lora", 16, 8192, 4_000_000),), 2048)
    times = {hw: CostModel.analytic(hw, big).step_seconds([mb]) for hw in ("l4", "a40", "a100-40gb", "h100")}
    assert times["l4"] > times["a40"] > times["a100-40gb"] > times["h100"]
    # a big layer is compute-bound: FLOPs / peak, plus the layer's 14 kernel launches
    h100 = CostModel.analytic("h100", big)
    flops = 2 * 8192 * big.layer_params + 4 * 8192 * 2048 * 4096
    assert h100._analytic_layer(mb, "fwd") == pytest.approx(flops / 989e12 + 14 * CostModel.LAUNCH_S, rel=1e-9)
    assert CostModel.analytic("NVIDIA H200", big).device == "h200 (analytic)"
    assert CostModel.analytic("NVIDIA A100-SXM4-80GB", big).hw["name"] == "a100-80gb"
    with pytest.raises(MuxTuneError, match="not in the catalog"):
        CostModel.analytic("NVIDIA L40S", big)  # not an L4
    assert CostModel.analytic("a100-80gb", big).p2p_seconds(300e6) == pytest.approx(10e-6 + 300e6 / 300e9)
    assert h100.backbone_bytes(32, True, True) > 6.5e9 * 2  # ~6.7B parameters in bf16
    with pytest.raises(MuxTuneError, match="not in the catalog"):
        CostModel.analytic("tpu-v9", big)


def test_calibrate_scales_by_the_measured_efficiency():
    shape = SHAPE
    own = CostModel.analytic("h100", shape)
    table = []
    for t, s in [(256, 64), (1024, 64)]:
        mb = MicroBatch((TaskLoad("lora", 0, t, 0),), s)
        table.append(prof._row("layer", "fwd", 3 * own._analytic_layer(mb, "fwd"), t, s))
        table.append(prof._row("head", "fwd", 2 * own._analytic_head(t, "fwd"), t))
    meta = synthetic_profile("cuda", "NVIDIA H100 80GB HBM3").meta
    gpu_profile = prof.Profile(pd.DataFrame(table, columns=prof.COLUMNS), meta)
    cm = CostModel.analytic("a100-80gb", shape).calibrate(gpu_profile)
    assert cm.scale["layer"] == pytest.approx(3.0) and cm.scale["head"] == pytest.approx(2.0)
    assert "calibrated on NVIDIA H100" in cm.device
    with pytest.raises(MuxTuneError, match="catalog GPU"):
        CostModel.analytic("h100", shape).calibrate(synthetic_profile())


def test_model_shape_weight_formula_matches_the_real_preset():
    from muxtune.executor.backbone import load_backbone

    model = load_backbone("builtin:tiny-llama").model
    shape = ModelShape.from_config(model.config)
    measured = prof.layer_param_bytes(model)
    norms = 2 * shape.hidden * 4  # two RMSNorm weights per layer, not in the GEMM formula
    assert shape.layer_params * 4 + norms == measured["layer"]
    assert (shape.n_layers, shape.kv_heads, shape.gated_mlp) == (2, 2, True)


# --- profile file, fingerprint cache -----------------------------------------------------------------


def test_profile_round_trips_and_bad_files_name_the_line(tmp_path):
    p = synthetic_profile()
    path = p.save(tmp_path / "p.csv")
    back = prof.Profile.load(path)
    assert back.meta == p.meta
    pd.testing.assert_frame_equal(back.table, p.table, check_dtype=False)
    # a profile from before the `target` column still loads (no target rows: method rows price LoRA)
    old = tmp_path / "old.csv"
    old.write_text(path.read_text().replace(",target\n", "\n").replace(",\n", "\n"))
    assert set(prof.Profile.load(old).table["target"]) == {""}
    (tmp_path / "bad.csv").write_text("op,phase\n")
    with pytest.raises(MuxTuneError, match=r"bad.csv:1: not a MuxTune profile"):
        prof.Profile.load(tmp_path / "bad.csv")
    with pytest.raises(MuxTuneError, match="cannot read profile"):
        prof.Profile.load(tmp_path / "missing.csv")


def test_stored_profiles_are_used_only_after_the_calibration_check(tmp_path, monkeypatch):
    """A stored profile of the same model, dtype and kind of device is a candidate whatever its device
    name or thread count; the calibration check decides: trusted as it is, rescaled (saved under this
    machine's fingerprint), or measured anew. A quick profile cannot serve a full request, nor one
    measured for some methods a config that uses others."""
    from muxtune.profiler import calibration

    monkeypatch.setenv("MUXTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(prof, "REPO_PROFILES", tmp_path / "shipped")
    (tmp_path / "shipped").mkdir()
    config = __import__("muxtune.executor.backbone", fromlist=["x"]).preset_config("builtin:tiny-llama")
    here = prof.fingerprint("cpu", "builtin:tiny-llama", config, torch.float32)
    elsewhere = {**here, "device_name": "Another CPU", "threads": here["threads"] + 3}
    stored = synthetic_profile()
    stored.meta.update(fingerprint=elsewhere, mode="quick", methods=["ia3", "lora"])
    stored.save(tmp_path / "shipped" / prof.profile_filename(elsewhere))
    gpt2 = synthetic_profile()
    gpt2.meta.update(fingerprint={**elsewhere, "model": "builtin:tiny-gpt2"}, mode="full")
    gpt2.save(tmp_path / "shipped" / prof.profile_filename(gpt2.meta["fingerprint"]))

    measured, verdicts = [], []
    monkeypatch.setattr(prof, "run_profile", lambda *a, **k: measured.append(k.get("methods")) or synthetic_profile())
    monkeypatch.setattr(calibration, "check", lambda profile, model, device: calibration.judge(verdicts.pop(0)))

    verdicts.append({"layer": 1.02, "head": 0.98})
    profile, path, reused = prof.load_or_profile("builtin:tiny-llama", "cpu", "quick")
    assert reused and path == tmp_path / "shipped" / prof.profile_filename(elsewhere) and not measured
    assert profile.meta["calibration"]["verdict"] == "trusted"

    verdicts.append({"layer": 2.1, "head": 2.0, "optimizer": 2.05})  # a uniformly slower machine
    profile, path, reused = prof.load_or_profile("builtin:tiny-llama", "cpu", "quick")
    assert reused and path == tmp_path / "cache" / "profiles" / prof.profile_filename(here)
    scale = profile.meta["calibration"]["scale"]
    assert scale == pytest.approx((2.1 * 2.0 * 2.05) ** (1 / 3), rel=1e-3)
    before, after = stored.table.set_index(["op", "phase", "tokens", "seq_len", "method", "rank", "params", "nbytes"]), \
        profile.table.set_index(["op", "phase", "tokens", "seq_len", "method", "rank", "params", "nbytes"])
    times = ~before.index.get_level_values("op").isin(["p2p", "allreduce"])
    assert ((after["seconds"][times] / before["seconds"][times]) / scale - 1).abs().max() < 1e-3
    assert (after["seconds"][~times] == before["seconds"][~times]).all()  # links between processes: as measured
    assert (after["saved_bytes"] == before["saved_bytes"]).all()  # memory is not time
    assert prof.Profile.load(path).meta["fingerprint"] == here

    # now two candidates: this machine's rescaled copy first; this time neither agrees
    verdicts += [{"layer": 0.5, "head": 1.0}, {"layer": 0.4, "head": 1.3}]
    _, _, reused = prof.load_or_profile("builtin:tiny-llama", "cpu", "quick", methods=["lora"])
    assert not reused and measured == [["lora"]] and not verdicts

    _, _, reused = prof.load_or_profile("builtin:tiny-llama", "cpu", "full")  # no full profile stored
    _, _, reused2 = prof.load_or_profile("builtin:tiny-llama", "cpu", "quick", methods=["prefix"])  # not covered
    assert not reused and not reused2 and len(measured) == 3 and not verdicts

    # a profile this process measured is used again without a check (the check would weigh this
    # machine's noise against itself minutes later); one written since by someone else is checked
    mine = synthetic_profile()
    mine.meta.update(fingerprint=here)
    monkeypatch.setattr(prof, "run_profile", lambda *a, **k: measured.append(k.get("methods")) or mine)
    _, path, reused = prof.load_or_profile("builtin:tiny-llama", "cpu", "quick", refresh=True)
    assert not reused and len(measured) == 4 and path == tmp_path / "cache" / "profiles" / prof.profile_filename(here)
    profile, again, reused = prof.load_or_profile("builtin:tiny-llama", "cpu", "quick")
    assert reused and again == path and not verdicts and len(measured) == 4
    assert profile.meta["calibration"]["measured_by_this_process"]
    prof.Profile.load(path).save(path)  # rewritten: another mtime
    verdicts.append({"layer": 1.01, "head": 1.0})
    _, _, reused = prof.load_or_profile("builtin:tiny-llama", "cpu", "quick")
    assert reused and not verdicts


def test_calibration_verdicts():
    from muxtune.profiler.calibration import judge

    assert judge({"a": 1.04, "b": 0.96, "c": 1.0}).verdict == "trusted"
    uniform = judge({"a": 0.42, "b": 0.44, "c": 0.45})
    assert uniform.verdict == "rescaled" and uniform.scale == pytest.approx((0.42 * 0.44 * 0.45) ** (1 / 3))
    # compute-bound ops twice as fast, the host-bound optimizer not: another thread count, not a speed
    assert judge({"layer": 0.5, "head": 0.52, "optimizer": 1.0}).verdict == "remeasure"
    # the host-bound optimizer is weighed by its small share of a step: a noisy x0.82 on it alone keeps
    # the profile (the same quiet machine 6 minutes later); the compute ops still set the scale
    assert judge({"layer fwd": 1.02, "layer bwd": 0.99, "head fwd": 1.01, "optimizer 1": 0.82}).verdict == "trusted"
    slower = judge({"layer fwd": 1.5, "layer bwd": 1.52, "head fwd": 1.49, "optimizer 1": 1.3})
    assert slower.verdict == "rescaled" and slower.scale == pytest.approx((1.5 * 1.52 * 1.49) ** (1 / 3))
    assert judge({"layer fwd": 1.02, "layer bwd": 0.99, "optimizer 1": 0.6}).verdict == "remeasure"
    assert judge({"layer fwd": 1.02, "layer bwd": 1.14, "optimizer 1": 1.0}).verdict == "remeasure"


def test_calibration_check_measures_the_reference_ops_on_the_real_backbone(mini_profile, monkeypatch):
    """On the profile's own points: each ratio is (now / stored); a profile whose times are all 3x what
    this machine measures is judged uniform and rescaled by about 1/3."""
    from muxtune.executor.backbone import load_backbone
    from muxtune.profiler import calibration
    from muxtune.profiler.sampling import Timed

    p, _ = mini_profile
    model = load_backbone("builtin:tiny-llama").model
    # the timers return what the stored profile says, times 1/3: the logic, not this machine's noise
    lookup = {}

    def fake_fwd_bwd(forward, device, s):
        out = forward()
        tokens = out[0].numel() // model.config.hidden_size if isinstance(out, tuple) else None
        key = ("layer", tokens) if tokens else ("head",)
        return lookup[key]

    points = calibration.reference_points(p)
    assert 1 <= len(points) <= 2 and all(t in set(p.rows("layer", "fwd")["tokens"]) for _, t in points)
    for seq, tokens in points:
        f = calibration.stored(p, "layer", "fwd", tokens=tokens, seq_len=seq)
        b = calibration.stored(p, "layer", "bwd", tokens=tokens, seq_len=seq)
        lookup[("layer", tokens)] = (Timed(f / 3, 0.01), Timed(b / 3, 0.01))
    head = calibration.stored(p, "head", "fwd", tokens=points[-1][1])
    lookup[("head",)] = (Timed(head / 3, 0.01), Timed(head / 3, 0.01))
    monkeypatch.setattr(calibration, "fwd_bwd_seconds", fake_fwd_bwd)
    opt = p.rows("optimizer", "step").sort_values("params")
    params = int(opt["params"].iloc[len(opt) // 2])
    monkeypatch.setattr(calibration, "measure_optimizer_row",
                        lambda device, params_, tensors: calibration.stored(p, "optimizer", "step", params=params_) / 3)
    check = calibration.check(p, model, "cpu")
    assert check.verdict == "rescaled" and check.scale == pytest.approx(1 / 3, rel=1e-6)
    assert f"optimizer {params}" in check.ratios and len(check.ratios) == 2 * len(points) + 2
    # and unpatched, on this machine: every reference measured, each ratio a positive finite number
    monkeypatch.undo()
    real = calibration.check(p, model, "cpu")
    assert set(real.ratios) == set(check.ratios) and all(0 < r < 1e3 for r in real.ratios.values())


def test_live_bytes_counts_no_view_of_a_tensor_that_existed_before():
    """A view (a weight's transpose, a slice) or an in-place result allocates nothing: only the matmul's
    output is new. Counting the weight's storage made llama-100m's step peaks ~330 MB too high."""
    weight = torch.randn(500, 500)  # 1 MB, there before
    x = torch.randn(4, 500)
    with prof.LiveBytes() as tally:
        y = x @ weight.t()  # t() is a view of the weight's storage; the product is new
        y.add_(1.0)  # in place
        head = weight[:10]  # a slice
    assert tally.peak == y.numel() * 4 and head.numel() == 5000


def test_live_bytes_tracks_the_peak_of_live_tensors():
    with prof.LiveBytes() as tally:
        a = torch.empty(250_000)  # 1 MB
        b = torch.empty(500_000)  # 2 MB
        del a, b
        c = torch.empty(125_000)  # 0.5 MB
    assert tally.peak == 3_000_000
    assert tally.live == 500_000
    del c


# --- a quick profile on the real executor ------------------------------------------------------------

MINI = {"layer": {16: [32, 64], 32: [64, 128]}, "task_seq": 16, "task_rows": [1, 2], "target_tokens": [32, 128],
        "ranks": {"lora": [2, 8], "ia3": [0], "prefix": [4], "prompt": [4, 20]},  # 20: more virtual tokens than task_seq
        "params": [1000, 10000], "nbytes": [4096, 65536], "warmup": 1, "repeats": 2}


@pytest.fixture(scope="module")
def mini_profile(tmp_path_factory):
    grids = dict(prof.GRIDS)
    prof.GRIDS["mini"] = MINI
    try:
        p = prof.run_profile("builtin:tiny-llama", "cpu", "mini", progress=False)
    finally:
        prof.GRIDS.clear()
        prof.GRIDS.update(grids)
    path = p.save(tmp_path_factory.mktemp("profile") / "mini.csv")
    return p, path


def test_prompt_ranks_past_the_task_rows_are_measured_on_longer_rows(mini_profile):
    """The full grid's prompt rank 96 exceeds its 32-slot task rows (a default
    `benchmarks.cost_model_accuracy` crashed on it): such a rank is measured on rows of rank + task_seq
    slots, and its rows say so."""
    p, _ = mini_profile
    prompt = p.rows("task", "fwd")
    prompt = prompt[prompt["method"] == "prompt"]
    assert set(zip(prompt["rank"], prompt["seq_len"])) == {(4, 16), (20, 36)}
    assert (prompt["tokens"] % prompt["seq_len"] == 0).all()


def test_quick_profile_measures_every_op_on_the_real_backbone(mini_profile):
    p, _ = mini_profile
    t = p.table
    assert set(t["op"]) == {"layer", "tp_layer", "stem", "model", "head", "task", "target", "uncovered", "step",
                            "optimizer", "p2p", "allreduce"}
    # one tensor rank's layer shard (tp=2: 2 of 4 heads, 1 of 2 KV heads, half the MLP) on the layer grid
    shard = p.rows("tp_layer", "fwd").set_index(["tokens", "seq_len"])
    assert len(shard) == 4 and set(shard["world"]) == {2} and len(p.rows("tp_layer", "bwd")) == 4
    whole = p.rows("layer", "fwd").set_index(["tokens", "seq_len"])
    # it saves the full-width inputs of q/k/v and gate/up and the norms' but half of the rest
    assert (whole["saved_bytes"] / 2 < shard["saved_bytes"]).all() and (shard["saved_bytes"] < whole["saved_bytes"]).all()
    # LoRA on each op of a layer alone: 2 ranks x 2 token counts x fwd/bwd, dropout at the first rank,
    # and what a second task on the op shares at the first rank, at both token counts
    targets = p.rows("target")
    assert set(targets["target"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(targets) == 7 * (2 * 2 * 2 + 2 * 2 + 2 * 2) and set(targets["method"]) == {"lora"}
    shared = targets[targets["phase"].str.startswith("shared_")]
    assert len(shared) == 7 * 2 * 2 and set(shared["rank"]) == {int(targets["rank"].min())}
    assert set(p.rows("step", "host_fixed")["tokens"]) == {16, 32}
    assert p.meta["task_targets"] == ["q_proj", "v_proj"]
    assert len(p.rows("layer", "fwd")) == 4 and len(p.rows("task")) == 4 * 6 * 2 + 2 * 4  # 6 (method, rank) x 2 row counts
    assert (p.rows("layer")["seconds"] > 0).all() and (p.rows("model")["seconds"] > 0).all()
    # the bare model's forward under no_grad (what an evaluation runs) on the same grid as its training forward
    grid = lambda phase: sorted(zip(p.rows("model", phase)["tokens"], p.rows("model", phase)["seq_len"]))
    assert grid("eval") == grid("fwd") and len(grid("eval")) == 4
    layer = p.rows("layer", "fwd").set_index(["tokens", "seq_len"])
    # saved activations grow with tokens and with the attention span
    assert layer.loc[(64, 16), "saved_bytes"] > layer.loc[(32, 16), "saved_bytes"] > 0
    assert layer.loc[(64, 32), "saved_bytes"] > layer.loc[(64, 16), "saved_bytes"]
    head = p.rows("head", "fwd")
    assert (head["peak_bytes"] >= head["tokens"] * 260 * 4).all()  # at least the float logits
    lora = p.rows("task", "fwd").query("method == 'lora'").set_index(["rank", "tokens"])
    # LoRA keeps its op's input alive (the backbone's tensor) besides its own rank-r activations
    assert 0 < lora.loc[(8, 32), "batch_bytes"] < lora.loc[(8, 32), "saved_bytes"]
    assert lora.loc[(8, 32), "params"] == 2 * 8 * ((64 + 64) + (64 + 32))  # A, B on q (64->64), v (64->32 kv)
    assert p.meta["fingerprint"]["model"] == "builtin:tiny-llama" and p.meta["shape"]["n_layers"] == 2
    assert set(p.rows("p2p")["nbytes"]) == {4096, 65536} and (p.rows("allreduce")["seconds"] > 0).all()
    cm = CostModel.from_profile(p)
    mb = MicroBatch((TaskLoad("lora", 4, 40, 2048), TaskLoad("ia3", 0, 24, 384)), 16)
    assert cm.step_seconds([mb]) > 0 and cm.activation_bytes(mb, 2) > 0
    mlp = MicroBatch((TaskLoad("lora", 4, 40, 2048, ("gate_proj", "up_proj", "down_proj"), 0.1),), 16)
    assert cm.step_seconds([mlp]) > 0
    assert cm.backbone_bytes(2, True, True) == sum(x.numel() * 4 for x in
                                                   __import__("muxtune.executor.backbone", fromlist=["x"])
                                                   .load_backbone("builtin:tiny-llama").model.parameters())


def test_rows_no_task_of_an_op_covers_are_priced_in_its_backward(mini_profile):
    """Tasks of a fused batch wrap different ops: an op's adapters return dX for every row (zero where
    none of its tasks is) and autograd adds it to the frozen op's dX. A task's `target` rows price that
    on its own rows only; the `uncovered` rows price the rest, per op input width, in the backward."""
    from muxtune.profiler.profile_file import Profile

    p, _ = mini_profile
    widths = p.meta["op_inputs"]
    assert widths["q_proj"] == [64] and widths["down_proj"] == [128] and widths["gate_proj"] == [64]
    rows = p.rows("uncovered", "bwd")
    assert set(rows["params"]) == {64, 128} and set(rows["tokens"]) == {32, 4096} and (rows["seconds"] > 0).all()
    cm = CostModel.from_profile(p)
    without = CostModel.from_profile(Profile(p.table[p.table["op"] != "uncovered"], p.meta))
    q = TaskLoad("lora", 4, 64, 2048, ("q_proj",))
    down = TaskLoad("lora", 4, 32, 2048, ("down_proj",))
    mixed = MicroBatch((q, down), 16)  # q_proj: 32 rows not its tasks'; down_proj: 64
    at = lambda width, tokens: float(np.interp(tokens, *zip(*sorted(zip(rows[rows["params"] == width]["tokens"],
                                                                          rows[rows["params"] == width]["seconds"])))))
    expected = 2 * (at(64, 32) + at(128, 64))  # x 2 layers
    with_rows, bare = cm.step_breakdown(mixed), without.step_breakdown(mixed)
    assert with_rows["bwd_tasks"] - bare["bwd_tasks"] == pytest.approx(expected, rel=1e-9) and expected > 0
    assert with_rows["fwd_tasks"] == bare["fwd_tasks"]
    # both tasks on q_proj cover every row of it: nothing left unpriced
    same = MicroBatch((q, TaskLoad("lora", 4, 32, 2048, ("q_proj",))), 16)
    assert cm.step_breakdown(same)["bwd_tasks"] == pytest.approx(without.step_breakdown(same)["bwd_tasks"])


def test_an_op_name_that_stands_for_several_ops_is_priced_at_each_of_their_widths(mini_profile):
    """GPT-2 names two ops of a layer `c_proj` (attention output, input = hidden; MLP down projection,
    input = 4 x hidden): a task targeting `c_proj` wraps both, so their uncovered rows are priced at both
    widths (they were priced at the first one's only). Profiles from before keep one int per name."""
    from muxtune.executor.backbone import load_backbone
    from muxtune.profiler.backbone_parts import op_input_widths
    from muxtune.profiler.profile_file import Profile

    widths = op_input_widths(load_backbone("builtin:tiny-gpt2").model)
    assert widths["c_proj"] == [64, 256] and widths["c_attn"] == [64] and widths["c_fc"] == [64]
    p, _ = mini_profile
    both = CostModel.from_profile(Profile(p.table, {**p.meta, "op_inputs": {"q_proj": [64, 128]}}))
    one = CostModel.from_profile(Profile(p.table, {**p.meta, "op_inputs": {"q_proj": 64}}))
    wide = CostModel.from_profile(Profile(p.table, {**p.meta, "op_inputs": {"q_proj": [128]}}))
    mixed = MicroBatch((TaskLoad("lora", 4, 64, 2048, ("q_proj",)), TaskLoad("lora", 4, 32, 2048, ("down_proj",))), 16)
    assert both._uncovered_seconds(mixed) == pytest.approx(one._uncovered_seconds(mixed) + wide._uncovered_seconds(mixed))
    assert wide._uncovered_seconds(mixed) > 0 and one._uncovered_seconds(mixed) > 0


def test_cli_profile_errors_exit_2_without_traceback(capsys, tmp_path):
    from muxtune.cli import main

    assert main(["profile", "--model", "builtin:nope", "--out", str(tmp_path / "p.csv")]) == 2
    assert "unknown builtin preset" in capsys.readouterr().err
    assert main(["profile", "--devices", "tpu"]) == 2
    assert "--devices" in capsys.readouterr().err
    assert main(["profile", "--sizes", "9216x512,4096"]) == 2
    err = capsys.readouterr().err
    assert "--sizes" in err and "'4096'" in err and "Traceback" not in err
    if not torch.cuda.is_available():
        assert main(["profile", "--devices", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_cli_profile_writes_then_reuses(mini_profile, capsys, tmp_path, monkeypatch):
    from muxtune.cli import main

    from muxtune.profiler import calibration

    p, path = mini_profile
    monkeypatch.setattr(torch, "get_num_threads", lambda: p.meta["fingerprint"]["threads"])
    # the check's own logic is tested above; here it agrees, as on a quiet machine right after measuring
    monkeypatch.setattr(calibration, "check", lambda profile, model, device: calibration.judge({"layer": 1.0}))
    out = tmp_path / "copy.csv"
    assert main(["profile", "--model", "builtin:tiny-llama", "--mode", "quick", "--out", str(path)]) == 0
    assert "reused stored profile" in capsys.readouterr().out
    # a quick profile of the same fingerprint on disk elsewhere is copied to --out
    monkeypatch.setattr(prof, "REPO_PROFILES", path.parent)
    path.rename(path.parent / prof.profile_filename(p.meta["fingerprint"]))
    assert main(["profile", "--model", "builtin:tiny-llama", "--mode", "quick", "--out", str(out)]) == 0
    assert {k: v for k, v in prof.Profile.load(out).meta.items() if k != "calibration"} == p.meta
    (path.parent / prof.profile_filename(p.meta["fingerprint"])).rename(path)


# --- adaptive repeats and the time budget ------------------------------------------------------------


def test_repeats_stop_once_the_median_is_known_or_at_the_bounds():
    from muxtune.profiler.sampling import Budget, Sampling, median_rel_error

    s = Sampling(warmup=1, least=3, most=9, rel_error=0.02)
    steady = [1.0, 1.0, 1.0]
    assert s.enough(steady) and not s.enough(steady[:2])
    noisy = [1.0, 1.5, 0.7, 1.3]
    assert median_rel_error(noisy) > 0.02 and not s.enough(noisy) and s.enough(noisy * 3)  # at `most`
    series: list[float] = []
    rounds = []
    for i in s.repeat(series):  # one warm-up round, then counted rounds until the series is enough
        rounds.append(i)
        if i >= 0:
            series.append(1.0)
    assert rounds == [-1, 0, 1, 2] and series == [1.0] * 3
    spent = Budget(seconds=60.0, estimate=10.0)
    spent.begin(0.0)  # a point whose share of the budget is already used
    late = Sampling(least=3, most=9, budget=spent)
    assert late.enough(noisy[:3]) and not s.enough(noisy[:3])
    # the median's relative standard error: 1.2533 * 1.4826 * MAD / sqrt(n) / median
    # past the WHOLE budget (a machine slower than the pilot said), one timed round is enough
    over = Budget(seconds=0.0, estimate=10.0)
    assert Sampling(least=3, most=9, budget=over).enough([1.0]) and not late.enough([1.0])
    assert not Sampling(least=3, most=9, budget=over).enough([])
    assert median_rel_error([9.0, 10.0, 11.0, 10.0]) == pytest.approx(1.2533 * 1.4826 * 0.5 / 2 / 10, rel=1e-6)


def test_an_overhead_is_the_median_of_each_rounds_difference_repeated_until_known(monkeypatch):
    """alternated(contrasts=...) takes each round's weighted sum of the calls' timings, then the median:
    a round where the machine was slow moves both sides of it alike. The difference of the two medians
    (the old estimate) is 3 here, the overhead every round shows is 1."""
    from muxtune.profiler import sampling
    from muxtune.profiler.sampling import CONTRAST_ERROR, Sampling, Timed, alternated

    rounds = iter([(5.0, 4.0), (7.0, 6.0), (100.0, 99.0), (7.0, 1.0), (5.0, 4.0)] + [(5.0, 4.0)] * 20)
    pending: list[float] = []

    def scripted(call, device, s):  # the calls' (forward, backward) timings, round by round
        if not pending:
            pending.extend(next(rounds))
        t = pending.pop(0)
        return Timed(t, 0.0), Timed(2 * t, 0.0)

    monkeypatch.setattr(sampling, "fwd_bwd_seconds", scripted)
    s = Sampling(warmup=0, least=5, most=5)
    [(fwd, bwd)] = alternated([None, None], "cpu", s, contrasts=[[1, -1]])
    assert fwd.seconds == 1.0 and bwd.seconds == 2.0  # medians of [1, 1, 1, 6, 1] and twice that
    [(a_fwd, _), (b_fwd, _)] = alternated([None, None], "cpu", s)
    assert (a_fwd.seconds, b_fwd.seconds) == (5.0, 4.0)
    # repeats run on while the difference is not yet known within CONTRAST_ERROR, up to `most`
    noisy = [1.0, 1.6, 0.5]
    assert sampling.median_rel_error(noisy) > CONTRAST_ERROR
    s = Sampling(warmup=0, least=3, most=9)
    assert s.enough([1.0] * 3) and not s.enough([1.0] * 3, contrasts=([1.0, 1.6, 0.5],))
    assert s.enough([1.0] * 9, contrasts=(noisy * 3,))


def test_the_trainers_head_sums_each_tasks_loss_and_hits_on_its_own_rows():
    """executor/forward.task_loss_sums (the trainer's head, and what the profiler's head rows time)
    against torch's cross-entropy and argmax per task, rows of two tasks, padding ignored."""
    from muxtune.executor.data import IGNORE
    from muxtune.executor.forward import task_loss_sums

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(3, 5, 8)
    targets = torch.randint(0, 11, (3, 5))
    targets[0, :2] = IGNORE
    targets[2, 4] = IGNORE
    sums, hits = task_loss_sums(head, hidden, targets, [0, 0, 1], 2, count_hits=True)
    for task, rows in ((0, [0, 1]), (1, [2])):
        h, t = hidden[rows].reshape(-1, 8), targets[rows].reshape(-1)
        keep = t != IGNORE
        logits = head(h[keep])
        assert torch.allclose(sums[task], torch.nn.functional.cross_entropy(logits, t[keep], reduction="sum"))
        assert hits[task] == int((logits.argmax(-1) == t[keep]).sum())
    assert task_loss_sums(head, hidden, targets, [0, 0, 1], 2, count_hits=False)[1] is None


def test_a_grid_that_does_not_fit_the_budget_is_thinned_in_order():
    from muxtune.profiler.budget import Pilot, fit, point_costs

    pilot = Pilot(fixed=0.01, per_token=2e-5, layers=4)
    grid = prof.GRIDS["quick"]
    full_cost = sum(point_costs(grid, pilot, LLAMA_OPS, True).values())
    same, _, cuts = fit(grid, 2 * full_cost, pilot, LLAMA_OPS, True)
    assert same == grid and cuts == []
    thinner, costs, cuts = fit(grid, 0.8 * full_cost, pilot, LLAMA_OPS, True)
    assert cuts and cuts[0] == "whole model up to 1024 tokens" and sum(costs.values()) <= 0.85 * 0.8 * full_cost
    assert all(len(ts) <= len(grid["layer"][seq]) for seq, ts in thinner["layer"].items())
    # every method is still measured (the CostModel needs each), and each curve keeps both its ends
    assert set(thinner["ranks"]) == set(grid["ranks"])
    for seq, ts in thinner["layer"].items():
        assert ts[0] == grid["layer"][seq][0] and ts[-1] == grid["layer"][seq][-1]
    thinnest, _, all_cuts = fit(grid, 1.0, pilot, LLAMA_OPS, True)
    assert len(all_cuts) >= len(cuts) and thinnest["repeats"] == 2 and thinnest["task_rows"] == [2]
    assert thinnest["least"] == 1  # a point behind the budget's pace: one timed round
    # per-op rows at one token count, halved twice (256 -> 64), never below a call's fixed cost
    assert thinnest["target_tokens"] == [64] and thinnest["difference_repeats"] == 1
    assert all(len(ts) >= 1 and ts[-1] >= ts[0] for ts in thinnest["layer"].values())
    assert all_cuts[-1].startswith("still estimated at")  # said, not hidden


def test_a_budget_cuts_the_whole_model_and_the_task_rows_before_the_layer_curves():
    """llama-100m on this 2-core CPU (fwd+bwd 2.2 ms per token): at the default 180 s the layer curves
    keep their largest points (4096 tokens). They were halved to 512 tokens before, and a 9216-token step
    was priced 45% low; the whole model, measured at every layer point, was most of their cost."""
    from muxtune.profiler.budget import Pilot, fit, point_costs, whole_model_points

    grid = prof.GRIDS["quick"]
    pilot = Pilot(fixed=0.01, per_token=2.2e-3, layers=12)
    fitted, costs, cuts = fit(grid, prof.DEFAULT_BUDGET["quick"], pilot, LLAMA_OPS, True)
    assert sum(costs.values()) <= 0.85 * prof.DEFAULT_BUDGET["quick"]
    assert max(t for ts in fitted["layer"].values() for t in ts) == 4096
    assert not any(c.startswith("largest layer sizes") for c in cuts)
    whole = whole_model_points(fitted)
    assert all(t <= 1024 or t == min(fitted["layer"][seq]) for seq, t in whole)
    assert {seq for seq, _ in whole} == set(fitted["layer"])  # every seq_len keeps a whole-model point
    # a layer point without the whole model costs a fraction of one with it
    with_model = point_costs(grid, pilot, LLAMA_OPS, True)[("layer", 64, 4096)]
    assert costs[("layer", 256, 4096)] < 0.2 * with_model
    # a config's step sizes are added to every candidate, never cut, and priced (layer rows only)
    sized, sized_costs, _ = fit(grid, prof.DEFAULT_BUDGET["quick"], pilot, LLAMA_OPS, True, sizes=[(9216, 512)])
    assert sized["layer"][512] == [512, 9216] and (512, 9216) not in whole_model_points(sized)
    assert 0 < sized_costs[("layer", 512, 9216)] < pilot.model(9216)  # less than one whole-model pass
    assert sum(sized_costs.values()) <= 0.85 * prof.DEFAULT_BUDGET["quick"]
    # only when the rest is cut to the bone do the layer curves shorten
    _, _, last = fit(grid, 1.0, pilot, LLAMA_OPS, True)
    assert last.index("largest layer sizes halved") > last.index("one row count per method (priced proportionally)")
    # a machine of the same kind 2.7x slower (an AMD EPYC VM: 6 ms per token, ~0.09 s fixed) still fits
    # the default budget: before the last steps of the ladder its thinnest grid was estimated at 317 s
    slow = Pilot(fixed=0.087, per_token=6e-3, layers=12)
    _, slow_costs, slow_cuts = fit(grid, prof.DEFAULT_BUDGET["quick"], slow, LLAMA_OPS, True)
    assert sum(slow_costs.values()) <= 0.85 * prof.DEFAULT_BUDGET["quick"]
    assert not slow_cuts[-1].startswith("still estimated") and "two repeats" in slow_cuts


def test_a_budgeted_profile_for_some_methods_measures_only_those(tmp_path):
    """A profile for a config's methods: only their task rows (LoRA's targets too), the thinning it did
    recorded, every timed row with its relative standard error."""
    p = prof.run_profile("builtin:tiny-llama", "cpu", "quick", comm=False, progress=False, budget=15.0,
                         methods=["lora", "ia3"], targets=["q_proj", "v_proj"], sizes=[(6144, 384)])
    assert p.meta["methods"] == ["ia3", "lora"] and p.meta["targets"] == ["q_proj", "v_proj"]
    # the config's step size is a layer point however much the budget cut (one row and the step), the
    # whole model only at its curve's smallest point
    assert {(384, 384), (384, 6144)} <= set(zip(p.rows("layer")["seq_len"], p.rows("layer")["tokens"]))
    assert set(p.rows("model")[p.rows("model")["seq_len"] == 384]["tokens"]) == {384}
    assert p.meta["sizes"] == [(6144, 384)]
    assert set(p.rows("task")["method"]) == {"lora", "ia3"}
    assert set(p.rows("target")["target"]) == {"q_proj", "v_proj"}
    assert p.meta["budget_s"] == 15.0 and p.meta["cuts"] and p.meta["setup_s"] >= 0
    # the points get the budget less loading the backbone and the pilot (setup_s: rounded to 0.1 s)
    assert p.meta["estimated_s"] <= 0.85 * max(15.0 - p.meta["setup_s"], 1.0) + 0.1
    # where the time went, by kind of point: [estimated, measured] seconds
    assert {"layer", "task", "target"} <= set(p.meta["spent_s"])
    assert all(estimated >= 0 and measured >= 0 for estimated, measured in p.meta["spent_s"].values())  # 0.1 s rounding
    assert p.meta["spent_s"]["layer"][1] > 0
    layer = p.rows("layer")
    assert layer["rel_error"].notna().all() and (layer["rel_error"] >= 0).all()
    saved = prof.Profile.load(p.save(tmp_path / "p.csv"))
    assert saved.table["rel_error"].equals(p.table["rel_error"])
    cm = CostModel.from_profile(saved)
    mb = MicroBatch((TaskLoad("lora", 8, 64, 2048, ("q_proj", "v_proj")), TaskLoad("ia3", 0, 32, 384)), 16)
    assert cm.step_seconds([mb]) > 0
    with pytest.raises(MuxTuneError, match="prefix"):
        cm.step_seconds([MicroBatch((TaskLoad("prefix", 8, 64, 2048),), 16)])


def test_a_profile_for_a_config_reaches_its_step_sizes():
    """plan-and-run and the simulator/pipeline benchmarks profile for a config: each task alone and all
    tasks in one padded group (the quickstart's 18 rows of 512 = 9216 tokens, which a 3-minute llama-100m
    profile used to price from curves ending at 512 tokens)."""
    from pathlib import Path

    from muxtune.run import profile_sizes
    from muxtune.spec import load_config

    config = load_config(Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml")
    assert profile_sizes(config) == [(1024, 128), (1024, 512), (1536, 384), (2048, 512), (9216, 512)]


def test_what_tasks_share_is_never_more_than_what_the_cheapest_of_them_costs():
    """A `shared` row is a difference of timings (one task vs two): measured through a burst of load
    elsewhere it can come out larger than a task's whole overhead (tiny-llama's v_proj: 4.6 ms against
    q_proj's 0.6), and every task after the first took it back: 6 LoRA tasks were priced 45% low. The
    CostModel takes back at most the cheapest task's own cost, so more tasks never cost less."""
    p = synthetic_profile()
    table = p.table.copy()
    burst = table["phase"].isin(["fwd_shared", "bwd_shared"])
    table.loc[burst, "seconds"] = 1.0  # far more than any task's overhead here (~1e-4 s)
    noisy = CostModel.from_profile(prof.Profile(table, p.meta))
    one = MicroBatch((TaskLoad("lora", 8, 300, 5000),), 50)
    six = MicroBatch(tuple(TaskLoad("lora", 8, 300, 5000) for _ in range(6)), 50)
    for fn in (noisy.forward_seconds, noisy.backward_seconds):
        assert fn(six, SHAPE.n_layers, True, True) >= fn(one, SHAPE.n_layers, True, True) > 0
    # with the shared rows as measured (smaller than a task's cost) the share is taken back in full
    cm = CostModel.from_profile(p)
    assert cm._batch_shared(six, "fwd") == pytest.approx(5 * SHARED["fwd"], rel=1e-9)
