"""The tensor-parallel half of the CostModel's time pricing (CostModel inherits it)."""

from __future__ import annotations

from muxtune.profiler.interpolation import interp_grid
from muxtune.profiler.shapes import MicroBatch
from muxtune.schedule import TENSOR_PARALLEL_FAMILIES
from muxtune.spec import METHODS, method_card


class TensorParallelPricing:
    """Tensor-parallel methods of CostModel: they read its shape, profile, hw and stage pricing."""

    # tensor parallelism: executor/tensor_parallel.py's Megatron split of a LLaMA-family decoder layer over
    # the tp processes of a stage. q/k/v/gate/up are column-parallel (output features / tp, heads / tp),
    # o/down row-parallel (input features / tp); embeddings, norms and the LM head are replicated. The
    # collectives the executor issues, each an all-reduce of the full hidden states [tokens, hidden]:
    #   forward   one per row-parallel op (its partial sums): 2 per layer
    #   backward  one per column-parallel op's input gradient (Megatron's f, one per op: q, k, v, gate,
    #             up): 5 per layer, less where the input needs no gradient (the first stage's first layer)
    # The executor waits for each (dist.all_reduce, synchronous): they are on the critical path.
    # After the backward, the partial gradients of replicated adapter tensors (a column op's LoRA A, a
    # row op's LoRA B: rank x hidden each) are all-reduced, one flat fp32 buffer per task.

    TP_FAMILY_NOTE = f"LLaMA-family (gated-MLP: {', '.join(TENSOR_PARALLEL_FAMILIES)}) models"
    ATTENTION_OPS = ("q_proj", "k_proj", "v_proj", "o_proj")

    def tp_refusal(self, tp: int, methods=()) -> str | None:
        """Why the executor would refuse tensor parallelism of degree tp for tasks of `methods` on this
        model (executor/tensor_parallel.check_supported), or None when it carries it out. ModelShape's
        gated_mlp is set exactly for the families the executor splits (llama, mistral, qwen2)."""
        if tp <= 1:
            return None
        s = self.shape
        if not s.gated_mlp:
            return f"tensor parallelism is implemented for {self.TP_FAMILY_NOTE} only"
        for what, n in (("heads", s.heads), ("kv_heads", s.kv_heads), ("intermediate", s.intermediate)):
            if n % tp:
                return f"tp={tp} does not divide the model's {what}={n}"
        other = sorted(m for m in set(methods) if not method_card(m).tensor_parallel)
        if other:
            split = [method_card(m).title for m in METHODS if method_card(m).tensor_parallel]
            return (f"method(s) {other} are not supported under tensor parallelism; only {', '.join(split)} "
                    f"{'is' if len(split) == 1 else 'are'}")
        return None

    def tp_fast_link(self) -> bool:
        """Whether the devices have a fast intra-node link (NVLink) that makes tensor parallelism's
        per-layer all-reduces worth planning; CPU processes (gloo) and PCIe-only GPUs do not."""
        return bool(self.hw is not None and self.hw.get("nvlink_gbps", 0) and self.hw["nvlink_gbps"] > 0)

    def tp_layer_seconds(self, mb: MicroBatch, phase: str, tp: int) -> float:
        """One decoder layer's compute on one tensor rank (its heads / tp and MLP width / tp; norms
        whole). Profile: its `tp_layer` rows for this tp (a rank's layer measured as such), else the
        whole layer / tp (every op of a LLaMA layer but its two norms and residual adds is split: an
        optimistic bound on a device where per-op overheads do not shrink with the shard)."""
        if self.profile is None:
            return self._analytic_layer(mb, phase, tp)
        rows = self.profile.rows("tp_layer", phase)
        rows = rows[rows["world"] == tp] if not rows.empty else rows
        if not rows.empty:
            return interp_grid(rows, "tokens", "seq_len", "seconds", mb.tokens, mb.span)
        return self._grid("layer", phase, mb.tokens, mb.span) / tp

    def tp_allreduce_bytes(self, mb: MicroBatch) -> int:
        """One tensor-parallel all-reduce of the micro-batch's hidden states (tokens x hidden x dtype)."""
        return mb.tokens * self.shape.hidden * self.shape.dtype_bytes

    def tp_allreduce_seconds(self, mb: MicroBatch, tp: int) -> float:
        return self.allreduce_seconds(self.tp_allreduce_bytes(mb), tp)

    def tp_comm_seconds(self, mb: MicroBatch, layers: int, first: bool, tp: int) -> float:
        """All the all-reduces a stage's forward and backward of `mb` wait for under tensor parallelism."""
        count = sum(self.tp_collectives(mb, layers, first, "fwd")) + sum(self.tp_collectives(mb, layers, first, "bwd"))
        return count * self.tp_allreduce_seconds(mb, tp) if tp > 1 else 0.0

    def tp_collectives(self, mb: MicroBatch, layers: int, first: bool, phase: str) -> list[int]:
        """The all-reduces of a stage's forward or backward under tp > 1, in execution order: the number
        that follow each of its 2 x layers compute segments (per layer: attention, then MLP; the backward
        runs the layers top down, MLP first). Forward: [1, 1] per layer (o_proj, down_proj). Backward:
        [2, 3] per layer (gate/up, then q/k/v input gradients), except the first stage's first layer,
        whose q/k/v input (the frozen embedding's normalized output) needs no gradient: [2, 0], or
        [0, 0] when no task adapts an attention op there (nothing below the MLP needs a gradient)."""
        if phase == "fwd":
            return [1, 1] * layers
        counts = [2, 3] * layers
        if first and layers:
            attention = any(not t.targets or any(name.rsplit(".", 1)[-1] in self.ATTENTION_OPS for name in t.targets)
                            for t in mb.tasks)  # no target list: the defaults (q_proj, v_proj)
            counts[-2:] = [2 if attention else 0, 0]
        return counts

    def tp_replicated_share(self, targets: tuple[str, ...]) -> float:
        """The share of a LoRA task's parameters that every tensor rank holds whole (a column op's A:
        r x in, a row op's B: out x r, both r x hidden); the rest is split over the ranks. No targets:
        the defaults (q_proj, v_proj)."""
        s = self.shape
        kv = s.hidden * s.kv_heads // s.heads
        dims = {"q_proj": (s.hidden, s.hidden), "k_proj": (s.hidden, kv), "v_proj": (s.hidden, kv),
                "o_proj": (s.hidden, s.hidden), "gate_proj": (s.hidden, s.intermediate),
                "up_proj": (s.hidden, s.intermediate), "down_proj": (s.intermediate, s.hidden)}
        names = [n.rsplit(".", 1)[-1] for n in (targets or ("q_proj", "v_proj"))]
        names = [n for n in names if n in dims]
        if not names:
            return 1.0  # not a split op: replicated
        return sum(s.hidden for n in names) / sum(sum(dims[n]) for n in names)

    def tp_params(self, params: int, targets: tuple[str, ...], tp: int) -> tuple[int, int]:
        """(parameters one tensor rank holds, of which replicated) for a LoRA task's `params` on a stage."""
        if tp <= 1:
            return params, 0
        replicated = round(params * self.tp_replicated_share(targets))
        return replicated + round((params - replicated) / tp), replicated
