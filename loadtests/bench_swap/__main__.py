"""Entry point of ``python -m loadtests.bench_swap`` (what it measures: the package docstring)."""

from loadtests.bench_swap.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
