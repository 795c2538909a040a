"""``python -m mpckv`` runs the command line (:func:`mpckv.cli.main`)."""

from __future__ import annotations

import sys

from mpckv.cli import main

if __name__ == "__main__":
    sys.exit(main())
