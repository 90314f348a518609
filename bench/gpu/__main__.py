"""`python -m bench.gpu`: the same as `python -m bench gpu`."""

import sys

from bench.gpu import main

main(sys.argv[1:])
