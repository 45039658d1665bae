"""Benchmarks run by `pagedllm bench ...` (workloads defined in shared/BENCHMARKS.md)."""
