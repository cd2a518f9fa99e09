"""A tests-only CostModel with hand-computable costs (a fixture, not a timing formula of the system).

Forward of a stage = layers * (per_layer + per_token * tokens) (+ embed/head constants on the first/last
stage); backward = bwd_factor * forward. Memory counts bytes with simple per-layer/per-token constants.
It has exactly the methods of the agreed CostModel interface (profiler/cost_model.py). Tensor parallelism:
a rank's layers cost per_layer / tp (the backbone's compute split evenly), each of its all-reduces
`tp_allreduce` seconds, and the all-reduces are the real CostModel's count (tp_collectives)."""

from __future__ import annotations

from dataclasses import dataclass

from muxtune.profiler.cost_model import CostModel


@dataclass(frozen=True)
class FakeShape:
    n_layers: int = 4
    hidden: int = 8
    intermediate: int = 16
    heads: int = 2
    kv_heads: int = 2
    vocab: int = 32
    dtype_bytes: int = 4


@dataclass
class FakeCostModel:
    shape: FakeShape = FakeShape()
    device: str = "fake"
    per_layer: float = 0.25  # seconds per layer per forward, whatever the tokens (launch/weight-load cost)
    per_token: float = 0.0  # seconds per token per layer
    embed: float = 0.0  # added to the first stage's forward
    head: float = 0.0  # added to the last stage's forward
    bwd_factor: float = 2.0
    p2p: float = 0.0  # seconds per transfer
    allreduce: float = 0.0  # seconds per all-reduce (world > 1)
    optimizer: float = 0.0  # seconds per optimizer call
    host: float = 0.0  # seconds of per-step host work per task
    layer_bytes: int = 1000
    act_bytes_per_token_layer: int = 10
    state_bytes_per_param: int = 16
    tp_allreduce: float = 0.0  # seconds per tensor-parallel all-reduce of the hidden states
    ATTENTION_OPS = CostModel.ATTENTION_OPS

    def forward_seconds(self, mb, layers, first=False, last=False, tp=1):
        return layers * (self.per_layer + self.per_token * mb.tokens) / tp + (self.embed if first else 0.0) + (
            self.head if last else 0.0)

    def backward_seconds(self, mb, layers, first=False, last=False, tp=1):
        return self.bwd_factor * self.forward_seconds(mb, layers, first, last, tp)

    # tensor parallelism: the real counts, constant prices
    tp_collectives = CostModel.tp_collectives

    def tp_allreduce_seconds(self, mb, tp):
        return self.tp_allreduce

    def tp_refusal(self, tp, methods=()):
        other = sorted(set(methods) - {"lora"})
        return f"method(s) {other}: only LoRA" if tp > 1 and other else None

    def tp_params(self, params, targets, tp):
        """Half of a task's parameters replicated, half split."""
        return params // 2 + params // 2 // tp, params // 2

    def optimizer_seconds(self, params):
        return self.optimizer

    def host_seconds(self, task):
        return self.host

    def batch_host_seconds(self, mb):
        return 0.0

    def evaluation_seconds(self, groups):
        return sum(self.forward_seconds(mb, self.shape.n_layers, True, True) for mb in groups)

    def p2p_seconds(self, nbytes):
        return self.p2p

    def allreduce_seconds(self, nbytes, world):
        return self.allreduce if world > 1 else 0.0

    def boundary_bytes(self, mb):
        return mb.tokens * self.shape.hidden * self.shape.dtype_bytes

    def activation_bytes(self, mb, layers, tp=1):
        return self.act_bytes_per_token_layer * mb.tokens * layers // tp

    def backbone_bytes(self, layers, first=False, last=False, tp=1):
        return self.layer_bytes * layers // tp + (500 if first else 0) + (700 if last else 0)

    def task_state_bytes(self, params):
        return self.state_bytes_per_param * params

    def held_bytes(self, mb, layers, first=True, tp=1):
        return self.activation_bytes(mb, layers, tp)

    def head_bytes(self, tokens):
        return 0  # the LM head's transient is left out: memory is backbone + states + activations in flight

    # the memory model itself is the real one, over the constants above
    in_flight_bytes = CostModel.in_flight_bytes
    peak_bytes = CostModel.peak_bytes
    fill_seconds = CostModel.fill_seconds  # the 1F1B fill and drain over the constants above

    def step_seconds(self, groups):
        n = self.shape.n_layers
        compute = sum(self.forward_seconds(mb, n, True, True) + self.backward_seconds(mb, n, True, True)
                      for mb in groups)
        return compute + sum(self.optimizer_seconds(t.params) + self.host_seconds(t) for mb in groups for t in mb.tasks)
