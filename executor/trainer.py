"""The multiplexed trainer: every step, the active tasks' batches go through the backbone as ONE fused
micro-batch; each task keeps its own loss, optimizer, schedule, clipping and step count.

Why a task trains exactly as it would alone: its loss is the mean over its own tokens, rows never
interact inside the backbone, and the total loss is the plain sum of the tasks' losses, so the
gradient reaching a task's adapter is the gradient of that task's loss alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import get_scheduler

from muxtune.executor.backbone import Backbone
from muxtune.executor.data import IGNORE, Example, FusedBatch, TaskSampler, fuse
from muxtune.executor.mux import Multiplexer, TaskAdapter
from muxtune.spec import TaskSpec


@dataclass
class TaskRun:
    """One task's training state inside the multiplexed job."""

    spec: TaskSpec
    adapter: TaskAdapter
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: TaskSampler
    step: int = 0
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0  # wall time of the steps this task took part in
    status: str = "running"

    @property
    def done(self) -> bool:
        return self.step >= self.spec.steps

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.adapter.parameters() if p.requires_grad]


def build_task_run(mux: Multiplexer, spec: TaskSpec, examples: list[Example]) -> TaskRun:
    adapter = mux.add_task(spec.name, spec.peft, spec.seed, spec.max_seq_len)
    params = [p for p in adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = get_scheduler(spec.lr_schedule, optimizer, num_warmup_steps=spec.warmup_steps,
                              num_training_steps=spec.steps)
    sampler = TaskSampler(examples, spec.batch_size, spec.seed)
    return TaskRun(spec, adapter, optimizer, scheduler, sampler)


class MultiplexedTrainer:
    def __init__(self, backbone: Backbone, specs: list[TaskSpec], examples: dict[str, list[Example]]):
        self.backbone = backbone
        self.model = backbone.model
        self.device = next(self.model.parameters()).device
        self.mux = Multiplexer(self.model)
        self.runs: dict[str, TaskRun] = {s.name: build_task_run(self.mux, s, examples[s.name]) for s in specs}
        self.step_times: list[float] = []
        self.step_tokens: list[int] = []  # real (non-padding) tokens of each step's fused batch
        self.step_shapes: list[tuple[int, int]] = []  # (rows, seq) each step actually computed

    @property
    def active(self) -> list[TaskRun]:
        return [run for run in self.runs.values() if not run.done and run.status == "running"]

    def step(self) -> dict[str, float]:
        """One optimizer step for every active task, from one fused forward and one backward."""
        runs = self.active
        start = time.perf_counter()
        batch = fuse({run.spec.name: run.sampler.next_batch() for run in runs},
                     self.backbone.tokenizer.pad_token_id, self.device)
        losses = self.task_losses(batch, training=True)
        torch.stack(list(losses.values())).sum().backward()
        losses = {name: float(loss.detach()) for name, loss in losses.items()}
        for run in runs:
            if run.spec.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(run.parameters(), run.spec.max_grad_norm)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        tokens = batch.tokens_per_task
        for run in runs:
            run.step += 1
            run.losses.append(losses[run.spec.name])
            run.tokens += tokens[run.spec.name]
            run.seconds += elapsed
            if run.done:
                run.status = "finished"
        self.step_times.append(elapsed)
        self.step_tokens.append(sum(tokens.values()))
        self.step_shapes.append(tuple(batch.input_ids.shape))
        return losses

    def task_losses(self, batch: FusedBatch, training: bool) -> dict[str, torch.Tensor]:
        """Mean next-token loss of each task over its own target tokens (as HF's causal-LM loss)."""
        with self.mux.route(batch.segments, batch.input_ids.shape[1], training=training):
            hidden = self.model.base_model(input_ids=batch.input_ids,
                                           attention_mask=batch.attention_mask).last_hidden_state
        targets = batch.labels[:, 1:]
        valid = targets != IGNORE
        # the LM head runs only on positions that carry loss: padding and prompts cost no vocab GEMM
        logits = self.model.get_output_embeddings()(hidden[:, :-1][valid])
        per_token = F.cross_entropy(logits.float(), targets[valid], reduction="none")
        row_task = torch.empty(batch.input_ids.shape[0], dtype=torch.long, device=self.device)
        for i, seg in enumerate(batch.segments):
            row_task[seg.start : seg.end] = i
        token_task = row_task[:, None].expand_as(valid)[valid]
        n = len(batch.segments)
        sums = torch.zeros(n, device=self.device).index_add(0, token_task, per_token)
        counts = torch.zeros(n, device=self.device).index_add(0, token_task, torch.ones_like(per_token))
        return {seg.task: sums[i] / counts[i] for i, seg in enumerate(batch.segments)}

    def train(self, progress: bool = True) -> None:
        from tqdm.auto import tqdm

        total = max(run.spec.steps for run in self.runs.values())
        with tqdm(total=total, desc="training", unit="step", disable=not progress) as bar:
            while self.active:
                losses = self.step()
                bar.update(1)
                bar.set_postfix({k[:12]: f"{v:.3f}" for k, v in list(losses.items())[:4]})
