"""Deprecated path: ``hereticlab.search.cli`` (this alias will be removed in 0.3; ``python -m hereticlab`` runs it)."""

if __name__ == "__main__":
    import sys

    from .search.cli import main

    sys.exit(main())
else:
    from ._moved import alias

    alias(__name__, "hereticlab.search.cli")
