"""How a Plan runs, as plain arithmetic every layer shares: where a process sits in a layout, how a
fusion group's step is cut into micro-batches, in what order a pipeline stage runs them, and what each
model family calls the parts that pipeline stages, tensor parallelism and the adapters cut.

The executor carries these out, the simulator and admission replay them, the planner prices them: one
copy, so they cannot drift apart. Plain Python beside spec.py: no torch, no executor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from muxtune.errors import MuxTuneError

# --- topology: process rank <-> (replica, stage, tensor rank) ----------------------------------------
# A layout's processes (and `FusionGroup.devices`) are replica-major: replica r, stage s, tensor rank t is
# process (r * pp + s) * tp + t. A "process rank" is this index, never a LoRA rank.


def process_rank(replica: int, stage: int, tensor_rank: int, pp: int, tp: int) -> int:
    """The process (and device index) of (replica, stage, tensor rank) in a dp x pp x tp layout."""
    return (replica * pp + stage) * tp + tensor_rank


def replica_of(rank: int, pp: int, tp: int) -> int:
    return rank // (pp * tp)


def stage_of(rank: int, pp: int, tp: int) -> int:
    return rank // tp % pp


def tensor_rank_of(rank: int, tp: int) -> int:
    return rank % tp


def stage_split(n_layers: int, pp: int, stage_layers: list[int] | None, where: str = "plan") -> list[int]:
    """Transformer layers of each stage: the plan's split, or an even one (earlier stages take the rest)."""
    if stage_layers is None:
        if pp > n_layers:
            raise MuxTuneError(f"{where}: pp={pp} stages but the model has only {n_layers} layers")
        return [n_layers // pp + (1 if s < n_layers % pp else 0) for s in range(pp)]
    if sum(stage_layers) != n_layers:
        raise MuxTuneError(f"{where}: layout.stage_layers {stage_layers} sums to {sum(stage_layers)}, "
                           f"the model has {n_layers} layers")
    return list(stage_layers)


def stage_range(split: list[int], stage: int) -> range:
    """The decoder layer indices of `stage` under `split` (as stage_split returns it)."""
    start = sum(split[:stage])
    return range(start, start + split[stage])


# --- the micro-batch split ---------------------------------------------------------------------------
# A group's step is cut into dp * micro_batches parts; every task's sequences are spread over them as
# evenly as possible, earlier parts taking the remainder. Micro-batch k of replica r is part k * dp + r,
# so a replica's parts are every dp-th one from r. Parts with no sequence are a suffix (a task with
# fewer sequences than parts fills the first ones), so dropping them keeps every other part's index.


def part_size(n: int, parts: int, index: int) -> int:
    """How many of `n` sequences part `index` of `parts` holds."""
    return n // parts + (1 if index < n % parts else 0)


def part_bounds(n: int, parts: int, index: int) -> tuple[int, int]:
    """[lo, hi) of part `index` of `parts` in a list of `n` sequences (contiguous parts, in order)."""
    lo = index * (n // parts) + min(index, n % parts)
    return lo, lo + part_size(n, parts, index)


# The LM head's logits of a micro-batch ([tokens, vocab], fp32 for the loss, with their softmax and gradient)
# are computed in pieces of at most this many bytes of fp32 logits: with a 128k vocabulary a fused batch
# of 80k tokens would hold ~120 GB at once. Smaller heads run whole (bit for bit as before).
HEAD_CHUNK_BYTES = 2**30


def head_chunk_tokens(vocab: int) -> int:
    """The most tokens whose logits the LM head computes at once (executor/forward.py, CostModel.head_bytes)."""
    return max(1, HEAD_CHUNK_BYTES // (4 * vocab))


def part_index(micro_batch: int, replica: int, dp: int) -> int:
    """Which part of the group's step is micro-batch `micro_batch` of `replica`."""
    return micro_batch * dp + replica


def replica_parts(parts: list, replica: int, dp: int) -> list:
    """A replica's parts, in its micro-batch order, out of all the step's parts in part order."""
    return parts[replica::dp]


# --- pipeline order ----------------------------------------------------------------------------------
# Plan.schedule: "1f1b" runs each group's micro-batches as its own 1F1B block with a flush between
# blocks; "interleaved" alternates the groups' micro-batches (g0 mb0, g1 mb0, g0 mb1, ...) in ONE block.


def blocks(per_group: list[list], schedule: str) -> list[list]:
    """The 1F1B blocks of one replica, in order, from each group's units (its micro-batches) in plan order."""
    if schedule == "1f1b":
        return [units for units in per_group if units]
    longest = max((len(units) for units in per_group), default=0)
    merged = [units[k] for k in range(longest) for units in per_group if k < len(units)]
    return [merged] if merged else []


def one_f_one_b(units: list, stage: int, stages: int) -> list[tuple[str, object]]:
    """The 1F1B order of one stage: warm-up forwards, then one forward / one backward, then the drain."""
    warm = min(stages - stage - 1, len(units))
    ops = [("fwd", u) for u in units[:warm]]
    for i in range(len(units) - warm):
        ops += [("fwd", units[warm + i]), ("bwd", units[i])]
    return ops + [("bwd", u) for u in units[len(units) - warm:]]


# --- model families ----------------------------------------------------------------------------------


class StageParts(NamedTuple):
    """Where a model family keeps what a pipeline stage cuts: the decoder layer list, the learned
    position embedding added to the input (None for rotary models) and the final norm."""

    layers: str
    positions: str | None
    final_norm: str


@dataclass(frozen=True)
class Family:
    """What MuxTune knows about one Hugging Face `model_type`.

    stage_parts: the module paths a pipeline stage cuts; None where pipeline stages are not supported.
    placement: the op ending the attention block and the op ending the feed-forward block (where the
        bottleneck adapter goes, matched by name suffix as HF PEFT matches target modules).
    attention_targets: the LoRA/DoRA targets the profiler measures task rows with (HF PEFT's defaults).
    tensor_parallel: the LLaMA layout (gated MLP, TP_COLUMN_OPS / TP_ROW_OPS under TP_LAYERS) that
        executor/tensor_parallel.py splits.
    """

    placement: dict[str, str]
    stage_parts: StageParts | None = None
    attention_targets: tuple[str, ...] = ("q_proj", "v_proj")
    tensor_parallel: bool = False


_LLAMA_PLACEMENT = {"attention": "o_proj", "ffn": "down_proj"}
FAMILIES = {
    "llama": Family(_LLAMA_PLACEMENT, StageParts("model.layers", None, "model.norm"), tensor_parallel=True),
    "mistral": Family(_LLAMA_PLACEMENT, tensor_parallel=True),
    "qwen2": Family(_LLAMA_PLACEMENT, tensor_parallel=True),
    # both of gpt2's output ops are named c_proj: the placement keeps the parent
    "gpt2": Family({"attention": "attn.c_proj", "ffn": "mlp.c_proj"},
                   StageParts("transformer.h", "transformer.wpe", "transformer.ln_f"), ("c_attn",)),
    "opt": Family({"attention": "out_proj", "ffn": "fc2"},
                  StageParts("model.decoder.layers", "model.decoder.embed_positions",
                             "model.decoder.final_layer_norm")),
}
DEFAULT_ATTENTION_TARGETS = ("q_proj", "v_proj")  # a family not in the table

TENSOR_PARALLEL_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.tensor_parallel)
TP_LAYERS = "model.layers"
TP_COLUMN_OPS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
TP_ROW_OPS = ("o_proj", "down_proj")


def attention_targets(model_type: str) -> list[str]:
    family = FAMILIES.get(model_type)
    return list(family.attention_targets if family else DEFAULT_ATTENTION_TARGETS)
