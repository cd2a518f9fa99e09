"""What one fused micro-batch computes through the multiplexed backbone: each task's summed next-token
loss over its own rows (and, for accuracy, its argmax hits), for chunk-aligned or padded batches, with
every task's sequence-level method (prompt tuning's virtual tokens, prefix tuning's K/V prefix) applied
to its own rows only. The trainer (executor/trainer.py) runs these inside its step loop; a pipeline
stage runs `chunked_embeds` (first stage) and `head_loss_sums` (last stage) around its own layers."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from muxtune.executor.alignment import ChunkedBatch, packed_attention
from muxtune.executor.data import IGNORE, FusedBatch
from muxtune.schedule import head_chunk_tokens


class FusedForward:
    """Mixed into the trainer, which provides `model`, `mux` (the Multiplexer), `device`, `stage`
    (executor/pipeline.Stage: this process's slice of the backbone) and `observer` (executor/hooks.py)."""

    def stage_loss_sums(self, batch: FusedBatch | ChunkedBatch, inputs: torch.Tensor | None, training: bool,
                        hits: dict[str, torch.Tensor] | None = None):
        """(each task's summed loss, None) on the last stage, (None, hidden states to send) before it.
        The whole model (one stage) is `loss_sums`; a pipeline stage runs its layers of the chunk stream,
        the first from the embeddings, the others from the previous stage's hidden states `inputs`."""
        if self.stage.parts is None:
            return self.loss_sums(batch, training=training, hits=hits), None
        with self.mux.route(batch.segments, batch.chunk_len, training=training, own_rows=True):
            embeds = self.chunked_embeds(batch) if self.stage.first else inputs
            with packed_attention(self.model, batch, {}), self.stage.run_layers(self.model):
                hidden = self.model.base_model(inputs_embeds=embeds, position_ids=batch.position_ids.reshape(1, -1),
                                               use_cache=False).last_hidden_state
        if not self.stage.last:
            return None, hidden
        with self.observer.phase("head"):
            return self.head_loss_sums(batch, hidden.view(*batch.targets.shape, -1), batch.targets, hits), None

    def _hidden_shape(self, batch: ChunkedBatch) -> tuple[int, int, int]:
        return (1, batch.input_ids.numel(), self.model.config.hidden_size)

    def task_losses(self, batch: FusedBatch | ChunkedBatch, training: bool) -> dict[str, torch.Tensor]:
        """Mean next-token loss of each task over its own target tokens (as HF's causal-LM loss)."""
        counts = batch.target_counts
        return {name: total / counts[name] for name, total in self.loss_sums(batch, training).items()}

    def loss_sums(self, batch: FusedBatch | ChunkedBatch, training: bool,
                  hits: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
        """Summed next-token loss of each task over its own target tokens in this micro-batch; `hits`
        adds up each task's correctly predicted (argmax) target tokens."""
        with self.mux.route(batch.segments, batch.input_ids.shape[1], training=training,
                            own_rows=isinstance(batch, ChunkedBatch)):
            if isinstance(batch, ChunkedBatch):
                hidden, targets = self.chunked_hidden_states(batch).view(*batch.targets.shape, -1), batch.targets
            else:
                hidden, targets = self.hidden_states(batch)[:, :-1], batch.labels[:, 1:]
        with self.observer.phase("head"):
            return self.head_loss_sums(batch, hidden, targets, hits)

    def head_loss_sums(self, batch: FusedBatch | ChunkedBatch, hidden: torch.Tensor,
                       targets: torch.Tensor, hits: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
        """Each task's summed loss from the last hidden states [rows, seq, d] and next-token targets
        [rows, seq] (the last pipeline stage runs only this part); `hits` as in loss_sums."""
        row_task = [i for i, seg in enumerate(batch.segments) for _ in range(seg.end - seg.start)]
        sums, counts = task_loss_sums(self.model.get_output_embeddings(), hidden, targets, row_task,
                                      len(batch.segments), hits is not None)
        if hits is not None:
            for seg, n in zip(batch.segments, counts):
                hits[seg.task] = hits.get(seg.task, 0) + n
        # one unbind, not a select per task (forward and backward)
        return dict(zip((seg.task for seg in batch.segments), sums.unbind(0)))

    def chunked_hidden_states(self, batch: ChunkedBatch) -> torch.Tensor:
        """Last hidden states [1, rows * chunk_len, d] of the flattened chunk stream. Attention stays
        inside each sequence; prompt tasks' virtual slots get their virtual tokens, prefix tasks'
        sequences see their K/V prefix (alignment.packed_attention)."""
        adapters = [self.mux.adapters[seg.task] for seg in batch.segments]
        embeds = self.chunked_embeds(batch)
        prefixes = {i: a.sequence.key_values(1, embeds.dtype) for i, a in enumerate(adapters) if a.prefix_tokens}
        with packed_attention(self.model, batch, prefixes):
            return self.model.base_model(inputs_embeds=embeds, position_ids=batch.position_ids.reshape(1, -1),
                                         use_cache=False).last_hidden_state

    def chunked_embeds(self, batch: ChunkedBatch) -> torch.Tensor:
        """Input embeddings [1, rows * chunk_len, d] of the chunk stream, prompt tasks' virtual tokens in
        their slots (the first pipeline stage runs only this part before its layers)."""
        adapters = [self.mux.adapters[seg.task] for seg in batch.segments]
        ids = batch.input_ids.reshape(1, -1)
        embeds = self.model.get_input_embeddings()(ids)
        if batch.virtual_slots:
            flat = embeds[0]
            for index, slots in batch.virtual_slots.items():
                placeholders = flat.new_zeros(slots.shape[0], slots.shape[1], flat.shape[-1])
                virtual = adapters[index].sequence.prepend(placeholders)  # [sequences, n, d]
                flat = flat.index_put((slots.reshape(-1),), virtual.reshape(-1, flat.shape[-1]))
            embeds = flat.unsqueeze(0)
        return embeds

    def hidden_states(self, batch: FusedBatch) -> torch.Tensor:
        """The backbone's last hidden states for the fused batch, with every task's sequence-level
        method applied to its own rows: prompt tuning's virtual tokens, prefix tuning's KV prefix."""
        adapters = [self.mux.adapters[seg.task] for seg in batch.segments]
        base = self.model.base_model
        if all(a.sequence is None for a in adapters):
            # use_cache=False: a cache would keep every layer's keys and values alive past the layer (for
            # nothing, in training), outside what a recomputed block frees (~2 [T, hidden] per layer)
            return base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
        rows, seq = batch.input_ids.shape
        embeds = self.model.get_input_embeddings()(batch.input_ids)
        parts = []
        for seg, adapter in zip(batch.segments, adapters):
            part = embeds[seg.start : seg.end]
            parts.append(adapter.sequence.prepend(part) if adapter.lead_tokens else part)
        embeds = torch.cat(parts, dim=0)
        # A prefix task's tokens sit at positions n.. after its n prefix slots (as with HF PEFT's cache).
        offset = torch.cat([torch.full((seg.end - seg.start,), a.prefix_tokens, device=self.device)
                            for seg, a in zip(batch.segments, adapters)])
        position_ids = torch.arange(seq, device=self.device)[None, :] + offset[:, None]
        mask, cache = batch.attention_mask, None
        longest = max(a.prefix_tokens for a in adapters)
        if longest:
            cache, prefix_mask = self._prefix_cache(batch, adapters, longest, embeds.dtype)
            mask = torch.cat([prefix_mask, mask], dim=1)
        return base(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=cache is not None,
                    **{_cache_kwarg(base): cache}).last_hidden_state

    def _prefix_cache(self, batch: FusedBatch, adapters, longest: int, dtype):
        """One KV region of `longest` slots for the whole batch: each prefix task's rows hold their
        prefix right-aligned in it; every other slot is masked out."""
        from transformers import DynamicCache

        from muxtune.executor.peft.prefix import kv_geometry

        layers, kv_heads, head_dim = kv_geometry(self.model)
        per_layer = [([], []) for _ in range(layers)]
        mask = torch.zeros(batch.input_ids.shape[0], longest, dtype=batch.attention_mask.dtype, device=self.device)
        for seg, adapter in zip(batch.segments, adapters):
            rows, n = seg.end - seg.start, adapter.prefix_tokens
            kv = adapter.sequence.key_values(rows, dtype) if n else None
            mask[seg.start : seg.end, longest - n :] = 1
            for layer, (keys, values) in enumerate(per_layer):
                for store, i in ((keys, 0), (values, 1)):
                    blank = torch.zeros(rows, kv_heads, longest - n, head_dim, dtype=dtype, device=self.device)
                    store.append(torch.cat([blank, kv[layer][i]], dim=2) if n else blank)
        cache = DynamicCache([(torch.cat(k, dim=0), torch.cat(v, dim=0)) for k, v in per_layer])
        return cache, mask


def _cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` during 5.x; older 5.x releases silently drop
    an unknown `cache=` into **kwargs (the prefix would vanish), so ask the model which name it takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def task_loss_sums(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, row_task: list[int],
                   tasks: int, count_hits: bool) -> tuple[torch.Tensor, list[int] | None]:
    """Each task's summed loss [tasks] (fp32) and, with `count_hits`, its correctly predicted (argmax)
    target tokens (one host read for all tasks), from the last hidden states [rows, seq, d] and next-token
    targets [rows, seq]; row `i` is task `row_task[i]`'s. The trainer's whole head, and what the profiler's
    `head` rows time (profiler/backbone_parts.head_loss): a copy there drifted (it left out the mask and
    the hit counts, ~0.5 ms a step on tiny-llama)."""
    valid = targets != IGNORE
    # the LM head runs only on positions that carry loss: padding and prompts cost no vocab GEMM
    per_token, predicted = token_losses(head, hidden[valid], targets[valid], count_hits)
    owner = torch.tensor(row_task, dtype=torch.long, device=hidden.device)  # built on the host: no op per task
    token_task = owner[:, None].expand_as(valid)[valid]
    sums = torch.zeros(tasks, device=hidden.device).index_add(0, token_task, per_token)
    if not count_hits:
        return sums, None
    # read off the logits: nothing of it reaches the loss or its gradient
    right = (predicted == targets[valid]).to(torch.long)
    return sums, torch.zeros(tasks, dtype=torch.long, device=hidden.device).index_add(0, token_task, right).tolist()


def token_losses(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, argmax: bool):
    """Each token's cross-entropy [tokens] (fp32) from its last hidden state [tokens, d], and its argmax
    prediction (None unless `argmax`). Up to schedule.head_chunk_tokens tokens at once it is one GEMM and
    one loss, as always; beyond, piece by piece, each piece's logits recomputed in the backward
    (torch.utils.checkpoint), so at most one piece's logits, softmax and gradient are alive at a time."""
    piece = head_chunk_tokens(head.weight.shape[0])
    if hidden.shape[0] <= piece:
        logits = head(hidden)
        return (F.cross_entropy(logits.float(), targets, reduction="none"),
                logits.detach().argmax(-1) if argmax else None)
    from torch.utils.checkpoint import checkpoint

    losses, predicted = [], []
    for start in range(0, hidden.shape[0], piece):
        loss, best = checkpoint(_piece_loss, head, hidden[start : start + piece], targets[start : start + piece],
                                use_reentrant=False)
        losses.append(loss)
        predicted.append(best)
    return torch.cat(losses), (torch.cat(predicted) if argmax else None)


def _piece_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor):
    logits = head(hidden)
    return F.cross_entropy(logits.float(), targets, reduction="none"), logits.detach().argmax(-1)
