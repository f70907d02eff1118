"""Benchmarks: offline engine throughput and HTTP serving load."""
