"""`python -m poelm`: the same entry point as the `poelm` console script."""

import sys

from .app.cli import main

sys.exit(main())
