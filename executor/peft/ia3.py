"""(IA)^3 (Liu et al. 2022): learned vectors that rescale activations, y = l * base(x).

Shape "scaling". Two kinds of target op, as in HF PEFT's IA3:
  - most ops: the op's OUTPUT is scaled, `base(x) * l`, l over out_features (the bias is scaled too);
    that is `aggregate`, after the shared op.
  - feed-forward ops (`feedforward_modules`, e.g. LLaMA's down_proj): the op's INPUT is scaled,
    `base(x * l)`, l over in_features; that is `dispatch`, on this task's rows before the shared op
    runs once over every task's rows.
Vectors start at ones (the adapter is the identity). Shapes, init, key names and arithmetic follow HF
PEFT 0.21.2's `ia3.Linear` (peft/tuners/ia3/layer.py), which also handles GPT-2's Conv1D: a task trains
bit-identically to `IA3Config` run alone.
"""

from __future__ import annotations

import torch
from torch import nn

from muxtune.errors import MuxTuneError
from muxtune.executor.backbone import op_features, target_ops
from muxtune.executor.flat_params import flat_parameters
from muxtune.methods.ia3 import CARD, METHOD, SHAPE, Config  # noqa: F401  (its torch-free half)


def is_feedforward(config: Config, path: str) -> bool:
    # HF PEFT's rule (IA3Model._check_target_module_feedforward): a plain suffix match, no dot required
    return any(path.endswith(name) for name in config.feedforward_modules)


def resolve(config: Config, model: nn.Module) -> Config:
    """Fill omitted target/feed-forward modules from HF PEFT's own per-model-type tables.

    The result must also be a config HF PEFT can reload: IA3Config requires feedforward_modules to be
    a subset of target_modules (by name), while peft itself, filling only the feed-forward default,
    may break that (e.g. targets [q_proj] on LLaMA get feed-forward [down_proj]; its saved adapter then
    fails to load). So a filled-in default keeps only the names that touch a targeted op (the others
    change nothing), and a name that touches targeted ops without being a target (GPT-2 targets
    [c_attn, c_proj], default [mlp.c_proj]) is added to the targets when that targets no new op."""
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD_DEFAULTS,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGET_DEFAULTS,
    )

    if config.target_modules is not None and config.feedforward_modules is not None:
        return config
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets, feedforward = config.target_modules, config.feedforward_modules
    if targets is None:
        if model_type not in TARGET_DEFAULTS:
            raise MuxTuneError(f"peft.target_modules: HF PEFT has no IA3 default for model type {model_type!r}; "
                               "give target_modules (and feedforward_modules)")
        targets = list(TARGET_DEFAULTS[model_type])
        if feedforward is not None and not set(feedforward) <= set(targets):
            raise MuxTuneError(f"peft.feedforward_modules: {sorted(set(feedforward) - set(targets))} are not "
                               f"among the default IA3 target_modules for {model_type!r}: {targets}")
    if feedforward is None:
        if model_type not in FEEDFORWARD_DEFAULTS:
            raise MuxTuneError(f"peft.feedforward_modules: HF PEFT has no IA3 default for model type "
                               f"{model_type!r}; give feedforward_modules (may be [])")
        targeted = {path for path, _ in target_ops(model, targets)}
        feedforward = []
        for name in FEEDFORWARD_DEFAULTS[model_type]:
            touched = {path for path in targeted if path.endswith(name)}
            if not touched:
                continue  # matches no targeted op: a no-op in peft, dropped so the export reloads
            if name not in targets:
                if not {path for path, _ in target_ops(model, [name])} <= targeted:
                    raise MuxTuneError(
                        f"peft.feedforward_modules: HF PEFT's default {name!r} for {model_type!r} overlaps "
                        f"target_modules {targets} only in part; give feedforward_modules explicitly")
                targets = [*targets, name]  # same ops targeted, but now peft's subset rule holds
            feedforward.append(name)
    return config.model_copy(update={"target_modules": targets, "feedforward_modules": feedforward})


class IA3Layer(nn.Module):
    """Non-feed-forward op: this task's rows of the shared output are scaled, base(x) * l."""

    def __init__(self, shape: tuple[int, int]):
        super().__init__()
        # peft's shapes, (out, 1) here and (1, in) on feed-forward ops, and init (ones): the exported
        # tensors load as they are
        self.ia3_l = nn.Parameter(torch.ones(shape))

    def aggregate(self, x: torch.Tensor, out: torch.Tensor, dropout_mask: torch.Tensor | None) -> torch.Tensor:
        # peft: `result * ia3_scaling` with ia3_scaling = 1 * l.flatten(); multiplying by 1 is exact
        return out * self.ia3_l.flatten()

    @staticmethod
    def grouped_aggregate(items, flat_x: torch.Tensor, flat_out: torch.Tensor, mux) -> torch.Tensor:
        """All IA3 output scalings of one op in one Triton launch (muxtune.kernels.ia3)."""
        return _grouped_scale([(layer, lo, hi) for layer, lo, hi, _ in items], flat_out, mux, IA3Layer.grouped_aggregate)

    def export_state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.ia3_l": self.ia3_l}

    def load_export_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        with torch.no_grad():
            self.ia3_l.copy_(state[f"{prefix}.ia3_l"])


class IA3FeedForwardLayer(IA3Layer):
    """Feed-forward op: this task's rows of the op's input are scaled, base(x * l); output untouched."""

    grouped_aggregate = None  # nothing to do after the op

    @staticmethod
    def grouped_dispatch(items, flat_x: torch.Tensor, mux) -> torch.Tensor:
        """All IA3 input scalings of one op in one Triton launch (muxtune.kernels.ia3)."""
        return _grouped_scale(items, flat_x, mux, IA3FeedForwardLayer.grouped_dispatch)

    def dispatch(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.ia3_l.flatten()

    def aggregate(self, x: torch.Tensor, out: torch.Tensor, dropout_mask: torch.Tensor | None) -> torch.Tensor:
        return out


def _grouped_scale(items, flat: torch.Tensor, mux, kind) -> torch.Tensor:
    """Each segment's rows of `flat` scaled by its task's l in one launch (muxtune.kernels.ia3), over the
    op's flat store of the l of every task whose layer uses `kind` (executor/flat_params.py)."""
    from muxtune.kernels.ia3 import SegmentedScale
    from muxtune.kernels.segments import build_segment_table

    store = flat_parameters(mux, items[0][0], kind, ("ia3_l",))
    layers = [layer for layer, *_ in items]
    spans = tuple((lo, hi) for _, lo, hi in items)
    offsets = tuple(store.offsets[id(layer)][0] for layer in layers)
    width = flat.shape[-1]
    table = mux.segment_table((kind, spans, offsets, width), lambda: build_segment_table(
        list(spans), [0] * len(spans), [], [], [1.0] * len(spans), flat.shape[0], flat.device,
        offsets=(list(offsets), [0] * len(spans))))
    return SegmentedScale.apply(flat, store.data, table, lambda write: store.accumulate(layers, write))


def build_layer(config: Config, base_op: nn.Module, path: str, generator: torch.Generator) -> IA3Layer:
    if config.target_modules is None or config.feedforward_modules is None:
        raise ValueError("ia3: call resolve(config, model) first to fill the default modules")
    in_features, out_features = op_features(base_op)
    layer = IA3FeedForwardLayer((1, in_features)) if is_feedforward(config, path) else IA3Layer((out_features, 1))
    layer.path = path  # the grouped path finds the op's flat store through it
    return layer


def hf_config(config: Config, base_model_name: str, fan_in_fan_out: bool):
    from peft import IA3Config

    return IA3Config(
        target_modules=list(config.target_modules),
        feedforward_modules=list(config.feedforward_modules),
        fan_in_fan_out=fan_in_fan_out,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name,
    )
