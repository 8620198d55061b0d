"""`python -m fusedpar {demo,bench,profile,kernels}`."""
from __future__ import annotations

import sys

from fusedpar.cli import main

if __name__ == "__main__":
    sys.exit(main())
