"""The GPU comparison run (same as `python -m gsa_compile bench`): see gsa_compile/benchmark.py."""
import argparse
import sys

from gsa_compile import benchmark

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    sys.exit(benchmark.run(quick=args.quick, out=args.out, timing=not args.no_timing,
                           sweep_lengths=benchmark.SWEEP_LENGTHS if args.sweep else ()))
