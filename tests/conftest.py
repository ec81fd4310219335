"""Shared fixtures: everything is built offline on CPU, in temporary directories."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the project is a flat cookbook, not an installed package
    sys.path.insert(0, str(REPO))
