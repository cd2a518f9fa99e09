"""The memory half of the CostModel (CostModel inherits it): what a device holds, from the backbone part and
the tasks' states to the activations its micro-batches keep in flight. `peak_bytes` is THE memory prediction:
admission, the simulator and the planner all call it."""

from __future__ import annotations

from muxtune.profiler.interpolation import interp1, interp_grid
from muxtune.profiler.shapes import MicroBatch
from muxtune.schedule import head_chunk_tokens
from muxtune.spec import method_card

ADAM_BYTES_PER_PARAM = 16  # fp32 weight + grad + exp_avg + exp_avg_sq
GRAD_BYTES_PER_PARAM = 4  # adapters train in fp32 (executor/mux.py), so their gradients are fp32


class MemoryModel:
    """Memory methods of CostModel: they read its shape, profile, weight_bytes, scale and profile look-ups."""

    def boundary_bytes(self, mb: MicroBatch) -> int:
        """The hidden states one pipeline stage sends the next (and the gradient coming back)."""
        return mb.tokens * self.shape.hidden * self.shape.dtype_bytes

    def activation_bytes(self, mb: MicroBatch, layers: int, tp: int = 1) -> int:
        """Tensors `layers` decoder layers keep for backward, per micro-batch in flight (the backbone's
        measured saved tensors, plus what each method's adapters keep alive, from its profile rows).
        tp > 1: one tensor rank's (its layer shard's saved tensors; the adapters' priced whole)."""
        self._check(mb)
        if self.profile is not None:
            per_layer = self._tp_saved_bytes(mb, tp)
            # the attention mask and rotary tables: one copy shared by every layer of the stage
            shared = self._grid("stem", "fwd", mb.tokens, mb.span, value="saved_bytes") if layers else 0.0
            # What adapters save is mostly whole-batch storage: a task's slice of an op's input or output
            # is a view that keeps the op's full [T, features] tensor alive. So each method counts once,
            # at the batch's T and its largest rank; and the backbone tensors it keeps (`batch_bytes`:
            # the op inputs of LoRA and DoRA, the op outputs of IA3 ...) count once per shape of method.
            rows = self.profile.rows("task", "fwd")
            kept: dict[str, float] = {}
            for method in {t.method for t in mb.tasks}:
                mine = rows[rows["method"] == method]
                if not mine.empty:
                    rank = max(t.rank for t in mb.tasks if t.method == method)
                    saved = interp_grid(mine, "tokens", "rank", "saved_bytes", mb.tokens, rank)
                    batch = interp_grid(mine, "tokens", "rank", "batch_bytes", mb.tokens, rank)
                    shape = method_card(method).shape
                    per_layer += (saved - batch) / self.shape.n_layers
                    kept[shape] = max(kept.get(shape, 0.0), batch)
            per_layer += sum(kept.values()) / self.shape.n_layers
        else:
            s = self.shape
            # inputs of q/k/v, o, gate/up, down, two norms, the attention output and the MLP activation
            # tp > 1: the inputs of q/k/v and gate/up and the two norms' stay whole (4 x hidden), the
            # attention output and the MLP's split
            whole = 4 * s.hidden if tp > 1 else 0
            per_token = s.dtype_bytes * (whole + (6 * s.hidden - whole + (3 if s.gated_mlp else 2) * s.intermediate) / tp)
            per_layer = mb.tokens * per_token * self.scale["activation"]
            shared = 0.0
        return int(max(per_layer, 0.0) * layers + max(shared, 0.0))

    def head_bytes(self, tokens: int) -> int:
        """Transient memory of the LM head + float loss over `tokens` (logits, softmax, their gradient).
        Beyond schedule.head_chunk_tokens the executor computes them piece by piece (executor/forward.py
        token_losses): one piece's transient, plus each further token's hidden state, loss and prediction."""
        piece = head_chunk_tokens(self.shape.vocab)
        if tokens > piece:
            return self._whole_head_bytes(piece) + (tokens - piece) * (self.shape.hidden * self.shape.dtype_bytes + 12)
        return self._whole_head_bytes(tokens)

    def _whole_head_bytes(self, tokens: int) -> int:
        if self.profile is not None:
            rows = self.profile.rows("head", "fwd")
            return int(max(interp1(rows["tokens"].to_numpy(), rows["peak_bytes"].to_numpy(), tokens), 0.0))
        return int(tokens * self.shape.vocab * (2 * self.shape.dtype_bytes + 8))

    def backbone_bytes(self, layers: int, first: bool = False, last: bool = False, tp: int = 1) -> int:
        """Frozen weights a device of a stage holds; tp > 1: its shard of each layer's projections plus
        the whole norms (2 x hidden), and the embedding / LM head whole (replicated)."""
        w = self.weight_bytes
        norms = 2 * self.shape.hidden * self.shape.dtype_bytes if tp > 1 else 0
        layer = (w["layer"] - norms) / tp + norms
        return int(layers * layer + (w["first"] if first else 0) + (w["last"] if last else 0))

    def _tp_saved_bytes(self, mb: MicroBatch, tp: int) -> float:
        """A layer's saved tensors on one tensor rank: the profile's `tp_layer` rows for this tp, else the
        whole layer's scaled as the analytic count splits them (see activation_bytes)."""
        whole = self._grid("layer", "fwd", mb.tokens, mb.span, value="saved_bytes")
        if tp <= 1:
            return whole
        rows = self.profile.rows("tp_layer", "fwd")
        rows = rows[rows["world"] == tp] if not rows.empty else rows
        if not rows.empty:
            return interp_grid(rows, "tokens", "seq_len", "saved_bytes", mb.tokens, mb.span)
        s = self.shape
        full = 6 * s.hidden + 3 * s.intermediate
        return whole * (4 * s.hidden + (full - 4 * s.hidden) / tp) / full

    def task_state_bytes(self, params: int) -> int:
        """Adapter weights + gradients + AdamW's two moments, all fp32."""
        return ADAM_BYTES_PER_PARAM * params

    def held_bytes(self, mb: MicroBatch, layers: int, first: bool = True, tp: int = 1) -> int:
        """Activations one micro-batch keeps on a device of a stage of `layers` layers from the start of its
        forward to the end of its backward: activation_bytes, less on the first stage what its backward never
        needs (the batch's `skip`: saved tensors below the lowest op its methods need a gradient at).
        A recomputed micro-batch (MicroBatch.recompute) holds its blocks' inputs and one block's working
        set (profiler/memory_knobs.py), skip or not."""
        if mb.recompute:
            from muxtune.profiler import memory_knobs  # (it prices with this model's own terms)

            return memory_knobs.activation_bytes(self, mb, layers, True, tp)
        skip = self._batch_skip(mb, "saved_bytes") if first and self.profile is not None else 0.0
        return int(max(self.activation_bytes(mb, layers, tp) - skip, 0.0))

    def in_flight_bytes(self, order: list[tuple[str, MicroBatch]], layers: int, first: bool = True,
                        last: bool = True, tp: int = 1) -> int:
        """The most activation bytes a device holds at once while it runs `order`: ("fwd", micro-batch) where a
        forward starts, ("bwd", micro-batch) where its backward ends, in time order (the executor's 1F1B order:
        schedule.one_f_one_b). On the last stage the micro-batch in its forward also holds the LM head's
        transient (logits, softmax and their gradient)."""
        held = peak = 0
        for kind, mb in order:
            if kind == "fwd":
                held += self.held_bytes(mb, layers, first, tp)
                peak = max(peak, held + (self.head_bytes(mb.tokens) if last else 0))
            else:
                held -= self.held_bytes(mb, layers, first, tp)
        return peak

    def peak_bytes(self, order: list[tuple[str, MicroBatch]], params: list[int], layers: int | None = None,
                   first: bool = True, last: bool = True, tp: int = 1) -> int:
        """THE memory prediction (admission, the simulator and the planner's single device call it): peak
        device memory of one device of a pipeline stage of `layers` layers (default: the single device
        holding the whole model) = its backbone part (its tensor-parallel shard when tp > 1) + every task's
        state (`params`: each task's adapter parameters on this device; fp32 weight, gradient, two AdamW
        moments) + the most activations in flight while it runs `order` (in_flight_bytes)."""
        layers = self.shape.n_layers if layers is None else layers
        return (self.backbone_bytes(layers, first, last, tp) + sum(self.task_state_bytes(p) for p in params)
                + self.in_flight_bytes(order, layers, first, last, tp))

    def step_memory_bytes(self, groups: list[MicroBatch]) -> int:
        """Transient peak of one single-device step (groups one after another) above the resident backbone,
        adapter weights and AdamW moments: the most activations in flight + every task's gradients (alive
        from backward to the optimizer). peak_bytes less the resident part."""
        order = [(kind, mb) for mb in groups for kind in ("fwd", "bwd")]
        grads = sum(GRAD_BYTES_PER_PARAM * t.params for mb in groups for t in mb.tasks)
        return self.in_flight_bytes(order, self.shape.n_layers) + grads
