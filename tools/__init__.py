"""Benchmarks, analysis and the GPU check; run from the repository root as `python -m tools.NAME`."""
