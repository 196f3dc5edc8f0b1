"""Benchmark harness: balancer against its peers (see bench/README.md). Run with `python -m bench`."""
