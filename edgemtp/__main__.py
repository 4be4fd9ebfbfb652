"""`python -m edgemtp`: the `edgemtp` command (where its script is not on PATH)."""

from .cli import main

main()
