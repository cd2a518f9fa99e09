"""Benchmarks for MuxTune (run from the repo root, e.g. `python -m benchmarks.mux_vs_separate`)."""
