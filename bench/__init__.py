"""Benchmarks for rrto_ros: the link emulator, the mode matrix and its report."""
