"""relay's benchmark suite.

``python -m bench [--quick|--smoke] [--out DIR]`` runs every comparison (see
bench/harness.py); the C helpers it compiles live in bench/c/.
"""
