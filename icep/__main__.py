"""``python -m icep``: the same command as ``icep`` (``icep run`` unless a command is named)."""

from icep.cli import main

main()
