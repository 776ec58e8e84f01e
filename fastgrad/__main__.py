"""``python -m fastgrad`` runs the command-line interface (``fastgrad --help``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
