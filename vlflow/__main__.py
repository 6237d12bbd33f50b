"""`python -m vlflow ...` runs the CLI (where no `vlflow` script is on PATH, e.g. a --target install)."""
import sys

from vlflow.cli import main

sys.exit(main())
