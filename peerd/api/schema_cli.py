"""``peerd api-schema``: the command-line entry of :mod:`peerd.api.openapi`, loaded lazily.

Every ``peerd`` invocation builds the whole parser; importing the generator (pydantic models of
the API) there cost every command, ``peerd ingest`` included, ~40 ms of start-up. This module
only declares the arguments; the generator is imported when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DOC_PATH = Path(__file__).with_name("openapi.json")


def arguments(parser: argparse.ArgumentParser) -> None:
    """``--check`` and ``--output`` (shared with ``python -m peerd.api.openapi``)."""
    parser.add_argument("--check", action="store_true", help="fail if the file is out of date")
    parser.add_argument("--output", type=Path, default=DOC_PATH, help="default: in the package")


def _run(args: argparse.Namespace, settings: Any) -> int:
    from peerd.api.openapi import write

    return write(args.output, check=args.check)


def register(subparsers: Any) -> None:
    """Add ``peerd api-schema`` to the command line."""
    p = subparsers.add_parser("api-schema", help="regenerate (or --check) the API's OpenAPI file")
    arguments(p)
    p.set_defaults(func=_run)
