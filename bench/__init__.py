"""Benchmarks: each writes bench/results/NAME.json with ratios against a baseline measured in the same run."""
