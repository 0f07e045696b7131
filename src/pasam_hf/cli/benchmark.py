"""`pasam benchmark`: PA-SAM against SAM and SAM-HQ on identical trunks (see docs/benchmarks.md)."""

from __future__ import annotations

import argparse

from ..benchmarking import BENCHMARKS, add_benchmark_arguments, run_benchmarks, settings_from_args
from . import CLIError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "benchmark",
        help="time PA-SAM against SAM and SAM-HQ (ratios of interleaved runs)",
        description="Runs the benchmarks of benchmarks/ and prints one markdown table each: absolute medians and "
        "PA-SAM/SAM (and SAM-HQ) ratios of interleaved repetitions.",
    )
    parser.add_argument("name", choices=BENCHMARKS + ("all",), help="which benchmark ('all' runs every one)")
    parser.add_argument("--output", type=str, default=None, help="also write the tables to this markdown file")
    add_benchmark_arguments(parser)
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CLIError(f"--device {args.device} asked for, but torch sees no CUDA device; use --device cpu.")
    names = BENCHMARKS if args.name == "all" else (args.name,)
    tables = run_benchmarks(names, settings_from_args(args))
    if args.output:
        with open(args.output, "w") as handle_:
            handle_.write("\n".join(table.to_markdown() for table in tables))
    return 0
