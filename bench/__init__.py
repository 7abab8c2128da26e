"""Benchmarks (`make bench`); results go to bench/results.json and are quoted in the README."""
