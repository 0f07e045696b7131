"""The `pasam` command line: one sub-command per module in this package.

Every sub-command module exposes `register(subparsers)`, which adds its parser and sets `func` to a handler
`func(args) -> int`. Errors a user can fix are raised as `CLIError` (or the standard exceptions listed in
`USER_ERRORS`) and printed as one line with exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

# Sub-command modules, in the order they appear in `pasam --help`. Missing modules are skipped so a partial
# install (or a sub-command whose optional dependency is absent) does not break the others.
SUBCOMMAND_MODULES = (
    "pasam_hf.cli.demo",
    "pasam_hf.cli.segment",
    "pasam_hf.cli.generate",
    "pasam_hf.cli.convert",
    "pasam_hf.cli.train",
    "pasam_hf.cli.cache",
    "pasam_hf.cli.evaluate",
    "pasam_hf.cli.benchmark",
    "pasam_hf.cli.export",
    "pasam_hf.cli.app",
)


class CLIError(Exception):
    """A problem the user can fix: the message names the problem and the fix."""


# Exceptions whose message is already a clear one-line explanation for the user.
USER_ERRORS = (CLIError, FileNotFoundError, ValueError, OSError, ImportError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pasam",
        description="PA-SAM (Prompt Adapter SAM) on Hugging Face transformers.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                continue
            raise
        module.register(subparsers)
    return parser


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split()) or type(error).__name__
    return message


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line, before or after the sub-command.
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from transformers.utils import logging as transformers_logging

    # transformers' own bars ("Loading weights", "Writing model shards") say nothing a command's user needs; the
    # commands show their own progress. Hub downloads keep huggingface_hub's bars.
    bars_were_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("pasam: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if debug:
            traceback.print_exc()
        else:
            print(f"pasam {args.command}: error: {_one_line(error)}", file=sys.stderr)
            print("(run with --debug for the full traceback)", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - the CLI never ends on a bare traceback
        if debug:
            traceback.print_exc()
        else:
            print(
                f"pasam {args.command}: unexpected error: {type(error).__name__}: {_one_line(error)} "
                "(run with --debug for the traceback and report it)",
                file=sys.stderr,
            )
        return 1
    finally:
        if bars_were_enabled:
            transformers_logging.enable_progress_bar()


__all__ = ["CLIError", "build_parser", "main"]
