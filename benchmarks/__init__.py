"""Throughput and latency benchmarks (``python benchmarks/<name>.py``; each module says what it measures)."""
