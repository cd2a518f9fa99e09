"""The measurements of a profile, one function per kind of row (profiler/profile.py's docstring lists the
rows): the backbone's parts, each method's task overhead, LoRA/DoRA per target op, the step's fixed host
work, the optimizer, the links between processes, and the pilot the time budget is planned from."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from muxtune.profiler.backbone_parts import (bare_model_loss, decoder_layers, head_inputs, head_loss, layer_call,
                                             synthetic_batch, target_names, tp_shard_layers, zero_grads)
from muxtune.profiler.budget import EVAL_WARMUP, Pilot
from muxtune.profiler.probes import adapter_saved_bytes, observe_step, peak_bytes, saved_bytes
from muxtune.profiler.sampling import Sampling, Timed, alternated, fwd_bwd_seconds, median_seconds
from muxtune.schedule import attention_targets
from muxtune.spec import method_card


def peft_config_for(method: str, rank: int, model_type: str) -> dict:
    """The task config a `task` row was measured with (its method card's probe at `rank`, on the model
    family's usual attention targets where it has targets)."""
    return method_card(method).probe(rank, attention_targets(model_type))


def _row(op, phase, timed: Timed | float, tokens=0, seq_len=0, method="", rank=0, params=0, nbytes=0, world=0,
         saved=0, batch=0, peak=0, target="") -> dict:
    if not isinstance(timed, Timed):  # a value not measured here (tests' synthetic profiles)
        timed = Timed(float(timed), math.nan)
    return {"op": op, "phase": phase, "tokens": tokens, "seq_len": seq_len, "method": method, "rank": rank,
            "params": params, "nbytes": nbytes, "world": world, "seconds": timed.seconds, "saved_bytes": saved,
            "batch_bytes": batch, "peak_bytes": peak, "target": target, "rel_error": round(timed.rel_error, 4)}


def measure_backbone(model, device: str, grid: dict, s: Sampling, progress, whole_model=None) -> list[dict]:
    """Layer, stem and head rows at every (seq_len, tokens) of `grid`; the whole model's rows at those of
    `whole_model` (budget.whole_model_points; default: all)."""
    rows = []
    parent, attr, layers = decoder_layers(model)
    layer = layers[0]
    shards = tp_shard_layers(model, layer)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for seq, token_counts in grid.items():
        for tokens in token_counts:
            progress.begin(("layer", seq, tokens))
            ids, mask = synthetic_batch(tokens // seq, seq, device)
            layer_fwd, hidden, grad, args, kwargs = layer_call(model, layer, ids, mask)
            f, b = fwd_bwd_seconds(layer_fwd, device, s)
            # the mask and rotary tables are built once per forward and shared by every layer: count
            # them once (on the stem row), not once per layer
            shared = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args[1:], kwargs))
                      if isinstance(t, torch.Tensor)}
            saved = saved_bytes(layer_fwd, weights | shared)
            saved_shared = saved_bytes(layer_fwd, weights) - saved
            peak = peak_bytes(lambda: torch.autograd.backward(*layer_fwd()), device)
            rows += [_row("layer", "fwd", f, tokens, seq, saved=saved, peak=peak),
                     _row("layer", "bwd", b, tokens, seq)]
            for tp, shard in shards.items():  # one tensor rank's layer on the same inputs

                def shard_fwd(shard=shard):
                    out = shard(hidden.requires_grad_(), *args[1:], **kwargs)
                    return (out[0] if isinstance(out, tuple) else out), grad

                f, b = fwd_bwd_seconds(shard_fwd, device, s)
                shard_weights = {p.untyped_storage().data_ptr() for p in shard.parameters()}
                rows += [_row("tp_layer", "fwd", f, tokens, seq, world=tp, saved=saved_bytes(shard_fwd, shard_weights | shared)),
                         _row("tp_layer", "bwd", b, tokens, seq, world=tp)]

            # the stem: the backbone's forward with its layer list emptied
            setattr(parent, attr, nn.ModuleList())
            try:
                with torch.no_grad():
                    stem = median_seconds(lambda: model.base_model(input_ids=ids, attention_mask=mask,
                                                                   use_cache=False), device, s)
            finally:
                setattr(parent, attr, layers)
            rows.append(_row("stem", "fwd", stem, tokens, seq, saved=saved_shared))
            if whole_model is not None and (seq, tokens) not in whole_model:
                progress.end()
                continue

            f, b = fwd_bwd_seconds(lambda: bare_model_loss(model, ids, mask), device, s)
            rows += [_row("model", "fwd", f, tokens, seq), _row("model", "bwd", b, tokens, seq)]
            # the same forward as evaluation runs it: under no_grad, no graph built. Its own warm-up first:
            # the first no_grad passes at a shape ran several times their steady time (tiny-llama on CPU;
            # steady, this row is 10-25% below the `fwd` one there)
            with torch.no_grad():
                warm = dataclasses.replace(s, warmup=s.warmup + EVAL_WARMUP)
                e = median_seconds(lambda: bare_model_loss(model, ids, mask), device, warm)
            rows.append(_row("model", "eval", e, tokens, seq))
            progress.end()

    for tokens in sorted({t for ts in grid.values() for t in ts}):
        progress.begin(("head", tokens))
        hidden, targets = head_inputs(model, tokens, device)
        f, b = fwd_bwd_seconds(lambda: head_loss(model, hidden.requires_grad_()[:, :-1], targets), device, s)
        peak = peak_bytes(lambda: head_loss(model, hidden.requires_grad_()[:, :-1], targets).backward(), device)
        rows += [_row("head", "fwd", f, tokens, peak=peak), _row("head", "bwd", b, tokens)]
        hidden.grad = None
        progress.end()
    return rows


def measure_tasks(backbone, device: str, spec: dict, s: Sampling, progress) -> list[dict]:
    """Each (method, rank, rows): the fused step with that one task attached vs the bare model on the
    same batch, in alternation so load on the machine hits both alike. Rows per point:
      fwd   forward with the task minus the bare forward
      bwd   backward with the task, run as deep as the bare one (input embeddings requiring grad),
            minus the bare backward: the task's own backward work
      skip  how much less the real backward does: it stops below the lowest op this method needs a
            gradient at (seconds; saved_bytes: tensors not kept for backward). A batch skips what
            the deepest-reaching of its methods allows, so the cost model counts this once per batch.
      step  the rest of the task's real trainer step: optimizer, clipping, schedule, sampling, fusing
            (timed inside that step: `observe_step`)
    """
    model, seq, out = backbone.model, spec["task_seq"], []
    embed = model.get_input_embeddings()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for method, ranks in spec["ranks"].items():
        # a difference of four timings: three times the repeats to keep its noise near the others'
        progress.begin(("shared", method))
        out += measure_shared(backbone, device, method, ranks[0], spec["task_rows"][0], seq,
                              s.times(spec.get("difference_repeats", 3)))
        progress.end()
        for rank in ranks:
            # a method whose virtual tokens take row slots (prompt tuning) needs rows longer than them:
            # rows of `rank` virtual + task_seq real slots where the grid's rank reaches past task_seq
            row_seq = seq + rank if method_card(method).lead_slots and rank >= seq else seq
            for n_rows in spec["task_rows"]:
                progress.begin(("task", method, rank, n_rows))
                trainer, batch = probe_trainer(backbone, device, method, rank, n_rows, row_seq, count=1)
                run = trainer.runs["probe0"]
                try:
                    params = sum(p.numel() for p in run.parameters())

                    def with_task():
                        return torch.stack(list(trainer.task_losses(batch, training=True).values())).sum()

                    def with_task_full_depth():
                        handle = embed.register_forward_hook(lambda m, a, output: output.detach().requires_grad_())
                        try:
                            return with_task()
                        finally:
                            handle.remove()

                    def bare():
                        return bare_model_loss(model, batch.input_ids, batch.attention_mask)

                    times = {k: [] for k in ("f1", "b1", "f2", "b2", "f0", "b0", "step")}
                    # each round's overheads (sampling.alternated): forward, backward at full depth, skip
                    diffs = {k: [] for k in ("fwd", "bwd", "skip")}
                    once = Sampling(warmup=0, least=1, most=1)
                    for i in s.repeat(*times.values(), contrasts=tuple(diffs.values())):
                        f1, b1 = fwd_bwd_seconds(with_task, device, once)
                        f2, b2 = fwd_bwd_seconds(with_task_full_depth, device, once)
                        f0, b0 = fwd_bwd_seconds(bare, device, once)
                        run.optimizer.zero_grad(set_to_none=True)
                        seen = observe_step(trainer, device)  # the real training step
                        step = seen["host"] + seen["optimizer"]
                        if i >= 0:
                            for k, v in zip(times, (f1.seconds, b1.seconds, f2.seconds, b2.seconds, f0.seconds,
                                                    b0.seconds, step)):
                                times[k].append(v)
                            for k, v in zip(diffs, (f1.seconds - f0.seconds, b2.seconds - b0.seconds,
                                                    b2.seconds - b1.seconds)):
                                diffs[k].append(v)
                    m = {k: Timed.of(v) for k, v in diffs.items()} | {"step": Timed.of(times["step"])}
                    mine = weights | {p.untyped_storage().data_ptr() for p in run.adapter.parameters()}
                    saved, batch_saved = adapter_saved_bytes(run.adapter, lambda: with_task().backward(), mine)
                    saved_skip = (saved_bytes(lambda: with_task_full_depth().backward(), mine)
                                  - saved_bytes(lambda: with_task().backward(), mine))
                    run.optimizer.zero_grad(set_to_none=True)
                finally:
                    trainer.mux.remove_task("probe0")
                tokens = n_rows * row_seq
                out += [_row("task", "fwd", m["fwd"], tokens, row_seq, method, rank, params, saved=saved,
                             batch=batch_saved),
                        _row("task", "bwd", m["bwd"], tokens, row_seq, method, rank, params),
                        _row("task", "skip", m["skip"], tokens, row_seq, method, rank, params, saved=saved_skip),
                        _row("task", "step", m["step"], tokens, row_seq, method, rank, params)]
                progress.end()
    return out


DROPOUT_P = 0.1  # the dropout the dropout_* rows are measured at (its cost does not depend on p)


def measure_targets(backbone, device: str, spec: dict, s: Sampling, progress) -> list[dict]:
    """Each (LoRA/DoRA, target op name, rank, tokens): one task targeting only that name; every op it
    wraps (all layers) is called as the model calls it, through its MultiplexedOp with the task's rows
    routed, forward and backward (dX, adapter gradients) minus the bare op on the same input, in
    alternation. Measured at the op, not as a difference of whole-model passes: the signal is the
    adapter work itself, so it stays readable on a busy machine and at large token counts.
    At the first rank also the same task with dropout: what the dropout (mask, masked input) adds."""
    model, seq, out = backbone.model, spec["task_seq"], []
    model_type, dtype = model.config.model_type, next(model.parameters()).dtype
    for method in [m for m in spec["ranks"] if method_card(m).targeted]:
        ranks = spec["ranks"][method]
        for target in target_names(model, spec):
            progress.begin(("target", method, target))
            for rank in ranks:
                for tokens in spec["target_tokens"]:
                    n_rows = tokens // seq
                    peft = {**peft_config_for(method, rank, model_type), "target_modules": [target]}
                    variants = {"plain": probe_trainer(backbone, device, method, rank, n_rows, seq, 1, "plain", peft)}
                    if rank == ranks[0]:
                        variants["dropout"] = probe_trainer(backbone, device, method, rank, n_rows, seq, 1, "drop",
                                                            {**peft, "dropout": DROPOUT_P})
                    try:
                        calls = {key: _wrapped_ops_loss(trainer, batch, n_rows, seq, dtype, device)
                                 for key, (trainer, batch) in variants.items()}
                        calls["bare"] = _wrapped_ops_loss(*variants["plain"], n_rows, seq, dtype, device, bare=True)
                        # calls: plain, [dropout,] bare; contrasts: plain - bare, [dropout - plain]
                        weights = {"plain": [1, 0, -1] if "dropout" in variants else [1, -1],
                                   "dropout": [-1, 1, 0]}
                        m = dict(zip([k for k in ("plain", "dropout") if k in variants],
                                     alternated(list(calls.values()), device, s,
                                                lambda: zero_grads(*(trainer for trainer, _ in variants.values())),
                                                contrasts=[weights[k] for k in variants])))
                    finally:
                        for trainer, _ in variants.values():
                            for name in list(trainer.runs):
                                trainer.mux.remove_task(name)
                    for k, phase in enumerate(("fwd", "bwd")):
                        out.append(_row("target", phase, m["plain"][k], tokens, seq, method, rank, target=target))
                        if "dropout" in m:
                            out.append(_row("target", f"dropout_{phase}", m["dropout"][k], tokens,
                                            seq, method, rank, target=target))
            for tokens in spec["target_tokens"][:2]:
                out += measure_target_shared(backbone, device, method, ranks[0], target, tokens // seq, seq,
                                             s.times(spec.get("difference_repeats", 3)))
            progress.end()
    return out


def measure_uncovered(device: str, widths: list[int], token_counts: list[int], dtype, s: Sampling,
                      progress) -> list[dict]:
    """What the backward of an op some task wraps costs on the rows NO task of it covers (one `uncovered`
    row per input width and token count: seconds for that many rows). The adapters' autograd node returns
    dX for the whole batch: those rows are zero-filled, then autograd adds the whole dX to the frozen op's
    (kernels/lora.py). A task alone on its rows (the `target` rows) pays the add on its own rows only,
    so in a fused batch where the tasks of an op cover some of the rows, this is the part left unpriced."""
    progress.begin(("uncovered",))
    rows = []
    for width in sorted(set(widths)):
        for tokens in sorted(set(token_counts)):
            base = torch.randn(tokens, width, device=device, dtype=dtype)

            def uncovered():
                dx = torch.empty(tokens, width, device=device, dtype=dtype)
                dx.zero_()
                return base + dx

            rows.append(_row("uncovered", "bwd", median_seconds(uncovered, device, s), tokens=tokens, params=width))
    progress.end()
    return rows


def measure_target_shared(backbone, device: str, method: str, rank: int, target: str, n_rows: int, seq: int,
                          s: Sampling) -> list[dict]:
    """What tasks of `method` on the same op NAME share: all LoRA tasks of an op run as one autograd node
    (`LoopedLoRA`, or one Triton launch), so a second task adds its matmuls but not the node. At the op,
    as `measure_targets`: O1 = one task of n_rows rows minus the bare op, O2 = two such tasks (2 n_rows
    rows) minus the bare op; each O = shared + per-task work, linear in rows, so shared = 2*O1 - O2.
    Rows `target` / `shared_fwd`, `shared_bwd` over the tokens of ONE task."""
    model = backbone.model
    peft = {**peft_config_for(method, rank, model.config.model_type), "target_modules": [target]}
    dtype = next(model.parameters()).dtype
    one = probe_trainer(backbone, device, method, rank, n_rows, seq, 1, "shared_one", peft)
    try:
        two = probe_trainer(backbone, device, method, rank, n_rows, seq, 2, "shared_two", peft)
    except BaseException:
        one[0].mux.remove_task("shared_one0")
        raise
    try:
        calls = [_wrapped_ops_loss(*one, n_rows, seq, dtype, device),
                 _wrapped_ops_loss(*one, n_rows, seq, dtype, device, bare=True),
                 _wrapped_ops_loss(*two, 2 * n_rows, seq, dtype, device),
                 _wrapped_ops_loss(*two, 2 * n_rows, seq, dtype, device, bare=True)]
        [shared] = alternated(calls, device, s, lambda: zero_grads(one[0], two[0]), contrasts=[SHARED])
    finally:
        for trainer, _ in (one, two):
            for name in list(trainer.runs):
                trainer.mux.remove_task(name)
    return [_row("target", f"shared_{phase}", shared[k], n_rows * seq, seq, method, rank, target=target)
            for k, phase in enumerate(("fwd", "bwd"))]


# Over timings [one task, bare, two tasks, bare]: each overhead O = shared + per-task work, linear in
# tasks, so the part a second task does not add again is 2*O1 - O2.
SHARED = [2, -2, -1, 1]


def _wrapped_ops_loss(trainer, batch, n_rows: int, seq: int, dtype, device: str, bare: bool = False):
    """A loss over every op the trainer's one task wraps, each called on a [rows, seq, in] input with
    the task's rows routed (bare: the frozen op alone on the same input)."""
    from muxtune.executor.backbone import op_features

    run = next(iter(trainer.runs.values()))
    ops = [trainer.mux.op(path) for path in run.adapter.paths]
    gen = torch.Generator().manual_seed(0)
    shapes = [op_features(op.base_op) for op in ops]
    xs = [torch.randn(n_rows, seq, i, generator=gen).to(device, dtype) for i, _ in shapes]
    grads = [torch.randn(n_rows, seq, o, generator=gen).to(device, dtype) for _, o in shapes]

    def loss():
        with trainer.mux.route(batch.segments, seq, training=True):
            outs = [(op.base_op if bare else op)(x.detach().requires_grad_()) for op, x in zip(ops, xs)]
        return sum((o * g).sum() for o, g in zip(outs, grads))
    return loss


def probe_trainer(backbone, device: str, method: str, rank: int, n_rows: int, seq: int, count: int,
                  name: str = "probe", peft: dict | None = None):
    """A trainer with `count` tasks of one method (n_rows rows of seq slots each) and their fused batch.
    Each task's last row is one token shorter: padding, as a fused batch of several tasks has."""
    from muxtune.executor.data import Example, fuse
    from muxtune.executor.trainer import MultiplexedTrainer

    from muxtune.spec import Alignment, TaskSpec

    peft = peft or peft_config_for(method, rank, backbone.model.config.model_type)
    lead = rank if method_card(method).lead_slots else 0
    length = seq - lead
    specs, examples = [], {}
    for i in range(count):
        specs.append(TaskSpec(name=f"{name}{i}", data="probe.jsonl", peft=peft, batch_size=n_rows, max_seq_len=length,
                              steps=1_000_000, seed=i))
        gen = random.Random(i)
        lengths = [length] * (n_rows - 1) + [length - 1 if n_rows > 1 else length]
        examples[f"{name}{i}"] = [Example(ids, list(ids)) for ids in
                                  ([gen.randrange(256) for _ in range(n)] for n in lengths)]
    trainer = MultiplexedTrainer(backbone, specs, examples,
                                 alignment=Alignment(layout="padded"))  # what the CostModel prices: rows x padded length
    batch = fuse(examples, backbone.tokenizer.pad_token_id, device, lead={task: lead for task in examples})
    return trainer, batch


def measure_step_fixed(backbone, device: str, spec: dict, s: Sampling, progress) -> list[dict]:
    """The host work of a trainer step that is there once per step, whatever the number of tasks (fusing
    the batch, routing, the loss bookkeeping, the step's own loop): a step's host time (the real
    `trainer.step()` minus its forward and backward, timed inside it) with 1 to 4 LoRA tasks of the same rows each,
    h(n) = fixed + n * per_task: fixed is the intercept of a least-squares line through the four (two
    points made it a difference of noisy differences). Rows `step` / `host_fixed` over the tokens of
    ONE task's rows (what a task-level `step` row is over)."""
    seq, counts, out = spec["task_seq"], (1, 2, 3, 4), []
    rank = spec["ranks"]["lora"][0]
    for n_rows in spec["task_rows"]:
        progress.begin(("step", n_rows))
        host, errors = {}, []
        for n in counts:
            trainer, batch = probe_trainer(backbone, device, "lora", rank, n_rows, seq, count=n, name=f"fixed{n}_")
            try:
                times: list[float] = []
                # a fit through small differences: more repeats
                for i in s.times(spec.get("difference_repeats", 3)).repeat(times):
                    seen = observe_step(trainer, device)
                    if i >= 0:
                        times.append(seen["host"] + seen["optimizer"])
                host[n] = statistics.median(times)
                errors.append(Timed.of(times).rel_error * host[n])
            finally:
                for name in list(trainer.runs):
                    trainer.mux.remove_task(name)
        per_task, fixed = (float(v) for v in np.polyfit(counts, [host[n] for n in counts], 1))
        # the intercept's standard error is about that of one point's median
        out.append(_row("step", "host_fixed", Timed(fixed, max(errors) / abs(fixed) if fixed else math.inf),
                        n_rows * seq, seq, "lora", rank))
        progress.end()
    return out


def measure_shared(backbone, device: str, method: str, rank: int, n_rows: int, seq: int,
                   s: Sampling) -> list[dict]:
    """The part of a method's overhead that tasks of that method share when fused together (one split
    and one concatenation per wrapped op, whatever the number of tasks): with O1 the overhead of one
    task and O2 that of two such tasks, each O = shared + per-task, so shared = 2*O1 - O2."""
    model = backbone.model
    one, batch1 = probe_trainer(backbone, device, method, rank, n_rows, seq, count=1, name="solo")
    try:
        two, batch2 = probe_trainer(backbone, device, method, rank, n_rows, seq, count=2, name="pair")
    except BaseException:
        one.mux.remove_task("solo0")
        raise
    loss = lambda tr, b: lambda: torch.stack(list(tr.task_losses(b, training=True).values())).sum()
    bare = lambda b: lambda: bare_model_loss(model, b.input_ids, b.attention_mask)
    calls = [loss(one, batch1), bare(batch1), loss(two, batch2), bare(batch2)]
    try:
        [shared] = alternated(calls, device, s, contrasts=[SHARED])
    finally:
        for name in ("solo0", "pair0", "pair1"):
            one.mux.remove_task(name)
    return [_row("task", phase, shared[k], n_rows * seq, seq, method, rank)
            for k, phase in enumerate(("shared_fwd", "shared_bwd"))]


def measure_optimizer(device: str, counts: list[int], tensors: int, s: Sampling, progress) -> list[dict]:
    """AdamW step + clip_grad_norm_ + zero_grad over `params` fp32 values split into `tensors` tensors
    (as a task's adapter layers are), with gradients present as after a backward."""
    from muxtune.executor.trainer import make_optimizer

    rows = []
    for params in counts:
        progress.begin(("optimizer", params))
        sizes = [params // tensors + (1 if i < params % tensors else 0) for i in range(tensors)]
        ps = [nn.Parameter(torch.zeros(max(s, 1), device=device)) for s in sizes]
        opt = make_optimizer(ps, lr=1e-4)  # the trainer's own (fused on the CPU)

        def step():
            for p in ps:
                p.grad = torch.ones_like(p)
            torch.nn.utils.clip_grad_norm_(ps, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        # the gradient fill stands for backward's output; time it separately and leave it out
        def fill():
            for p in ps:
                p.grad = torch.ones_like(p)
            for p in ps:
                p.grad = None

        t = median_seconds(step, device, s) - median_seconds(fill, device, s)
        rows.append(_row("optimizer", "step", Timed(max(t.seconds, 0.0), t.rel_error), params=params))
        progress.end()
    return rows


def _comm_worker(rank: int, world: int, init_file: str, backend: str, sizes: list[int], s: Sampling,
                 result_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    rows = []
    for n in sizes:
        buf = torch.zeros(max(n // 4, 1), dtype=torch.float32, device=device)

        def p2p():  # one send from rank 0 to rank 1, confirmed by a 1-element reply
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf[:1], 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf[:1], 0)

        dist.barrier()
        # both ranks must run the same number of rounds: a fixed count, not one decided by each rank's samples
        rows.append(_row("p2p", "comm", median_seconds(p2p, device, s), nbytes=n, world=world))
        dist.barrier()
        rows.append(_row("allreduce", "comm", median_seconds(lambda: dist.all_reduce(buf), device, s),
                         nbytes=n, world=world))
    if rank == 0:
        Path(result_file).write_text(json.dumps(rows))
    dist.destroy_process_group()


def measure_comm(device: str, sizes: list[int], s: Sampling) -> list[dict]:
    """p2p and all-reduce between 2 processes. CUDA needs 2 visible GPUs for NCCL; with one, nothing is
    measured and the cost model takes link bandwidths from the hardware catalog."""
    import torch.multiprocessing as mp

    if device.startswith("cuda"):
        if torch.cuda.device_count() < 2:
            return []
        backend = "nccl"
    else:
        backend = "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "comm.json"
        fixed = Sampling(warmup=s.warmup, least=s.most, most=s.most)  # see _comm_worker
        mp.start_processes(_comm_worker, args=(2, str(Path(tmp) / "init"), backend, sizes, fixed, str(result)), nprocs=2, join=True,
                           # spawn, never fork: CUDA cannot be forked, and on CPU children forked after this
                           # process ran a backward pass (autograd's threads) hang in their first collective
                           start_method="spawn")
        return json.loads(result.read_text())


def pilot(model, device: str) -> Pilot:
    """The bare model's forward + backward at two token counts: the line every point's price comes from."""
    # 128 and 512 tokens, two timed rounds each: on a slow machine (llama-100m at 6 ms per token) the
    # pilot at 256 and 1024 tokens with three rounds took 31 s of a 180 s budget (it priced the points
    # within 2% of what they took; this one ~10% short: the profile header's `spent_s`)
    seq, small, large = 64, 128, 512
    once = Sampling(warmup=1, least=2, most=2)
    timed = {}
    for tokens in (small, large):
        ids, mask = synthetic_batch(tokens // seq, seq, device)
        f, b = fwd_bwd_seconds(lambda: bare_model_loss(model, ids, mask), device, once)
        timed[tokens] = f.seconds + b.seconds
    per_token = max((timed[large] - timed[small]) / (large - small), 0.0)
    return Pilot(max(timed[small] - per_token * small, 0.0), per_token, model.config.num_hidden_layers)
