"""Benchmarks: print a table and write JSON to loadtests/results/; not timed tests."""
