"""`python -m bolaco` is the `bolaco` command."""

import sys

from .cli import main

sys.exit(main())
