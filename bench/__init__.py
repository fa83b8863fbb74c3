"""Benchmarks of the combiner, each with its baseline measured in the same run.

Run ``python -m bench [--quick] [--smoke] [--out FILE]``; see bench/README.md.
"""
