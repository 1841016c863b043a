"""`python -m nlsr_fast` runs the `nlsr-fast` command line."""

import sys

from nlsr_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
