"""Run the ``qatcore`` command line as ``python -m qatcore``."""

from qatcore._cli import main

raise SystemExit(main())
