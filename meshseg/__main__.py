"""``python -m meshseg`` runs the command-line tool."""

from meshseg.cli import main

main()
