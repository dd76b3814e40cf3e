"""`python -m bolaco` is the `bolaco` command."""

from .cli import run

run()
