"""Benchmarks for MuxTune: `python -m benchmarks.<name>` from the repository root, or
`python -m muxtune.benchmarks.<name>` from anywhere (the same modules, installed as muxtune.benchmarks)."""

import muxtune  # noqa: F401  first: takes the checkout root off sys.path before anything imports transformers
