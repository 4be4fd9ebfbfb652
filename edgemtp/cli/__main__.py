"""`python -m edgemtp.cli`: the `edgemtp` command."""

from . import main

main()
