"""``python -m critloop.cli``."""

from critloop.cli import main

main()
