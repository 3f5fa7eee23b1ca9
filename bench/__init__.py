"""Benchmarks: workloads, baselines and reports (results in docs/)."""
