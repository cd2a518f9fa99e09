"""A task's validation set and what its evaluations decide (the fused forward-only evaluation itself is
`MultiplexedTrainer.evaluate`, beside the training step it must never disturb; in a multi-process plan
it runs through the pipeline stages, each replica on its share, the figures summed on every process).

Where the validation examples come from: `validation_data`, a file read exactly as the training file
(same formats, masking, truncation and bad-line handling: data.load_examples), or `validation_split`,
a share of the training file chosen by the task's seed (its own stream, so the split never depends on
other tasks) and left out of the training examples altogether.

What an evaluation decides: the task's best valid_loss so far and, with `early_stopping`, whether it
stops. An evaluation counts as better only when it is lower than the best by more than `min_delta`;
after `patience` evaluations in a row that are not, the task stops (`stopped_early`) and its adapter
is put back to the weights of its best evaluation, which is what gets exported.
"""

from __future__ import annotations

import torch

from muxtune.errors import MuxTuneError
from muxtune.executor.data import IGNORE, DataOptions, DataStats, Example, example_origin, load_examples
from muxtune.executor.mux import SPLIT_STREAM, stream_seed


class ExampleSubset:
    """Some of a data set's examples, by index (the training part of a split); indexes like a list."""

    def __init__(self, data, indices: list[int]):
        self.data, self.indices = data, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.data[self.indices[index]]


def split_examples(data, spec) -> tuple[ExampleSubset, list[Example]]:
    """(training part, validation examples): spec.held_out(n) examples drawn by the task's seed; both
    parts keep the file's order."""
    n = len(data)
    n_valid = spec.held_out(n)
    if n - n_valid < 1:
        raise MuxTuneError(f"{spec.data}: validation_split: {spec.validation_split} of {n} example(s) leaves none "
                           "to train on")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(stream_seed(spec.seed, SPLIT_STREAM))).tolist()
    return ExampleSubset(data, sorted(order[n_valid:])), [data[i] for i in sorted(order[:n_valid])]


def load_task_data(spec, tokenizer, key: str) -> tuple[object, list[Example] | None, DataStats]:
    """A task's (training examples, validation examples or None, stats of its data file). `key` names
    the task in messages (e.g. "tasks[2]")."""
    options = DataOptions.of(spec)
    train, stats = load_examples(spec.data, tokenizer, spec.max_seq_len, key=f"{key}.data", options=options)
    if spec.validation_data is not None:
        valid, _ = load_examples(spec.validation_data, tokenizer, spec.max_seq_len, key=f"{key}.validation_data",
                                 options=options)
        valid, source = list(valid), spec.validation_data
    elif spec.validation_split is not None:
        train, valid = split_examples(train, spec)
        source = spec.data
    else:
        return train, None, stats
    # load_examples drops examples without a target token; this guards what its checks do not see
    if not any(label != IGNORE for ex in valid for label in ex.labels[1:]):
        raise MuxTuneError(f"{source}: {key}: the validation set has no loss-bearing token")
    return train, valid, stats


def record_evaluation(run, valid_loss: float, accuracy: float) -> None:
    """Add an evaluation at the task's current step; update its best, and stop it early when its
    patience has run out (its adapter back at its best weights)."""
    run.evaluations.append({"step": run.step, "valid_loss": valid_loss, "valid_mean_token_accuracy": accuracy})
    stopping = run.spec.early_stopping
    min_delta = stopping.min_delta if stopping is not None else 0.0
    if run.best_loss is None or valid_loss < run.best_loss - min_delta:
        run.best_loss, run.best_step, run.bad_evaluations = valid_loss, run.step, 0
        if stopping is not None:  # only an early-stopping task can end on other weights than its last
            run.best_state = {k: v.detach().clone() for k, v in run.adapter.state_dict().items()}
        return
    run.bad_evaluations += 1
    if stopping is not None and run.bad_evaluations >= stopping.patience and run.status in ("running", "finished"):
        run.status = "stopped_early"
        run.adapter.load_state_dict(run.best_state)


def example_problem(example: Example, vocab_size: int, max_seq_len: int) -> str | None:
    """Why an example cannot be trained on (a corrupt cache row, a bad source), or None."""
    ids, labels = example.input_ids, example.labels
    if not ids or len(ids) != len(labels):
        return f"{len(ids)} token ids but {len(labels)} labels"
    if len(ids) > max_seq_len:
        return f"{len(ids)} tokens, longer than max_seq_len={max_seq_len}"
    if min(ids) < 0 or max(ids) >= vocab_size:
        return f"token id {min(ids) if min(ids) < 0 else max(ids)} outside the vocabulary (0..{vocab_size - 1})"
    if any(label != IGNORE and label != token for label, token in zip(labels, ids)):
        return "a label that is neither -100 nor its token id"
    return None


def check_validation(trainer, run) -> None:
    """Check a task's validation examples once, as it joins: they are held in memory and evaluated
    whole at every evaluation, so this sees every row evaluation will. A corrupt one (a damaged cache
    row) would break the fused forward of every task due with it; instead it fails this task only,
    naming the file and line it came from (on_bad_line: error), or is left out and counted (skip),
    as a corrupt training example is when drawn."""
    if not run.validation:
        return
    kept = []
    source = run.spec.validation_data or run.spec.data  # a split's examples come from the training file
    for example in run.validation:
        problem = example_problem(example, trainer.vocab_size, run.spec.max_seq_len)
        if problem is None:
            kept.append(example)
        elif run.spec.on_bad_line == "error":
            where = f"{source}: an example" if example.index is None else example_origin(  # None: built in memory
                source, trainer.backbone.tokenizer, run.spec.max_seq_len, DataOptions.of(run.spec), example.index)
            trainer.fail(run, f"corrupt validation data: {where}: {problem}")
            return
        else:
            run.bad_examples += 1
    if not any(label != IGNORE for ex in kept for label in ex.labels[1:]):
        trainer.fail(run, f"corrupt validation data: no usable example left in {source} ({run.bad_examples} corrupt)")
        return
    run.validation = kept
