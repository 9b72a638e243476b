"""`python -m bilevel.cli`: the same as the `bilevel` command."""

import sys

from . import main


sys.exit(main())
