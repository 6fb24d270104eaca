"""``python -m peerd``: same as the ``peerd`` console script."""

from peerd.ctl import main

raise SystemExit(main())
