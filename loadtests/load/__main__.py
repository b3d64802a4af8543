"""Entry point of ``python -m loadtests.load`` (what it runs: the package docstring)."""

from loadtests.load.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
