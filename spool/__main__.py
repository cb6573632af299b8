"""`python -m spool ...` runs the `spool` command."""
import sys

from spool.cli.main import main

sys.exit(main())
