"""``python -m splitlearn.cli``."""

from . import main

main()
