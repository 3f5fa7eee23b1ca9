"""Benchmarks: the link emulator, the mode matrix, scheduler workloads and their reports."""
