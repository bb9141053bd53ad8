"""`python -m gridvm` runs the gridvm CLI."""

from gridvm.cli.main import main

main()
