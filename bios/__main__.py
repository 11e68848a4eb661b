"""`python -m bios ...` runs the command line."""

import sys

from bios.cli import main

sys.exit(main())
