"""Benchmarks: `python -m bench [names...] [--quick]`. See bench/common.py for the conventions."""
