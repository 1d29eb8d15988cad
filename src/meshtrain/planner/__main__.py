"""`python -m meshtrain.planner plan ...` runs the planner without the main CLI."""

import sys

from meshtrain.planner.cli import main

sys.exit(main())
