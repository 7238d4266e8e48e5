"""``python -m alignscan <command>``: the command line (alignscan.cli)."""
from alignscan.cli import main

raise SystemExit(main())
