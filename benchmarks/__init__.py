"""Benchmark scripts: ``python -m benchmarks.<name> [--options]`` from the repo root. They print figures with
a baseline measured in the same run; they are not tests."""
