"""``python -m peerd``: same as the ``peerd`` console script."""

from peerd.cli import main

raise SystemExit(main())
