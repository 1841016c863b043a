"""``python -m nlsr_fast.demo [options]``: the same as ``nlsr-fast demo`` (the pinned child process it starts)."""

import argparse
import sys

from nlsr_fast.demo import add_arguments, main

parser = argparse.ArgumentParser(prog="nlsr-fast demo")
add_arguments(parser)
sys.exit(main(parser.parse_args()))
