"""`python -m bilevel.cli`: the same as the `bilevel` command."""

import sys

from . import console_main


sys.exit(console_main())
