"""``python -m hereticlab …`` runs the ``hereticlab`` command."""

import sys

from .search.cli import main

sys.exit(main())
