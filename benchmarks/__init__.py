"""Benchmark scripts: ``python benchmarks/<name>.py [--options]`` from the repo root (or ``python -m
benchmarks.<name>``). They print figures with a baseline measured in the same run; they are not tests."""
