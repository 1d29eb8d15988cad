import sys

from meshtrain.cli import main

# Guarded: worker processes started with "spawn" (meshtrain prepare-data) import this module again.
if __name__ == "__main__":
    sys.exit(main())
