"""python -m bench: run the side-by-side benchmark (see bench/harness.py)."""
import sys

from bench.harness import main

sys.exit(main())
