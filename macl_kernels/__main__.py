"""``python -m macl_kernels``: the same console script as ``macl-kernels`` (see ``cli.py``)."""

import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
