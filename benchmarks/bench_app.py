"""Benchmark: see docs/benchmarks.md. Usage: python benchmarks/bench_app.py [--quick] [--device cuda] [--dtype bfloat16]"""

import sys

from pasam_hf.benchmarking import script_main

if __name__ == "__main__":
    sys.exit(script_main("app"))
