"""The ``peerd`` command (console script and ``python -m peerd``): the light ingest path, else
the full CLI.

``peerd ingest`` is handed to a running daemon through :mod:`peerd.ctl`, which imports only the
standard library; every other command, and an ingest no daemon takes, loads :mod:`peerd.cli`.
"""

from __future__ import annotations

import os
import sys

from peerd import ctl


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``peerd`` command: the light ingest path, else the full CLI."""
    args = sys.argv[1:] if argv is None else argv
    parsed = ctl.light_args(args)
    if parsed is not None:
        g, ing = parsed
        state = ctl.light_state_dir(g.config, g.state_dir, os.environ)
        if state is not None:
            rc = ctl.ingest_via_daemon(state, ing)
            if rc is not None:
                return rc
    from peerd.cli import main as full_main

    return full_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
