"""``peerd api-schema``: registered without importing the API models.

The CLI builds every subcommand's parser on each start; importing :mod:`peerd.api.openapi`
(pydantic models, signing) for that cost every command, ``peerd ingest`` included, ~50 ms.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DOC_PATH = Path(__file__).with_name("openapi.json")


def arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``peerd api-schema`` and ``python -m peerd.api.cli``."""
    parser.add_argument("--check", action="store_true", help="fail if the file is out of date")
    parser.add_argument("--output", type=Path, default=DOC_PATH, help="default: in the package")


def _run(args: argparse.Namespace, settings: object) -> int:
    from peerd.api.openapi import write

    return write(args.output, check=args.check)


def main(argv: list[str] | None = None) -> int:
    """``python -m peerd.api.cli [--check] [--output PATH]``."""
    parser = argparse.ArgumentParser(prog="python -m peerd.api.cli", description=__doc__)
    arguments(parser)
    return _run(parser.parse_args(argv), None)


def register(subparsers: Any) -> None:
    """Add ``peerd api-schema`` to the command line."""
    p = subparsers.add_parser("api-schema", help="regenerate (or --check) the API's OpenAPI file")
    arguments(p)
    p.set_defaults(func=_run)


if __name__ == "__main__":
    raise SystemExit(main())
