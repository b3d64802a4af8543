"""The ``loraswap`` command: one argparse tree, each package contributes its own subcommands.

Subcommand modules expose ``add_parsers(subparsers)``; each leaf parser sets ``func(args) -> int``.
Domain errors print as ``error[type]: message`` plus a hint, with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from basemodel.errors import LoraswapError

# transformers warns at import time that torchvision is absent; loraswap never needs it.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Libraries whose INFO lines (one per HTTP request for httpx) would break up loraswap's own output,
# e.g. the progress bar of ``generate``: WARNING and above unless ``--verbose``.
LIBRARY_LOGGERS = ("httpx", "httpcore", "urllib3", "botocore", "boto3", "s3transfer", "filelock", "PIL")

# Modules that contribute subcommands, in help order. Each has ``add_parsers(subparsers)``.
SUBCOMMAND_MODULES = (
    "service.serve_cli",
    "basemodel.cli",
    "adapters.cli",
    "training.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraswap",
        description="Stable Diffusion server with per-request LoRA hot-swap, and its adapter trainer.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, libraries' log lines included"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # package not present in this build
            raise
        module.add_parsers(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except LoraswapError as exc:
        print(f"error[{exc.type}]: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
