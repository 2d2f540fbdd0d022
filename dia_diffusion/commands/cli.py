"""The `dia-diffusion` console script: one sub-command per tool, each defined in its own module."""

import argparse
import sys
from collections.abc import Callable

from dia_diffusion.commands import fid, params
from dia_diffusion.evaluation import correlation, heldout_loss
from dia_diffusion.runtime.errors import print_once

# Each module exposes `add_parser(subparsers)`, which registers its sub-commands and the function that runs them.
COMMANDS = (params, correlation, fid, heldout_loss)
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command ended by Ctrl-C


class OneLineArgumentParser(argparse.ArgumentParser):
    """Reports a bad flag in one line (argparse's usage block would come first), like every other input error."""

    def error(self, message: str) -> None:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def run_reporting_errors(prog: str, command: Callable[[], int | None]) -> int:
    """Runs a command; an ordinary failure becomes one stderr line starting with `prog` and an exit status."""
    try:
        return command() or 0
    except (ValueError, FileNotFoundError) as error:
        # Bad input (a dataset spec, a path, an argument value) is reported as one line, not a traceback.
        print_once(f"{prog}: error: {error}")
        return EXIT_BAD_INPUT
    except OSError as error:
        # The machine, not the input: a full disk, a folder that cannot be written.
        print_once(f"{prog}: error: {error}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        # Every command writes its outputs whole (to a temporary name, then renamed), so none is half-written.
        print_once(f"{prog}: interrupted")
        return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="dia-diffusion", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineArgumentParser)
    for command in COMMANDS:
        command.add_parser(subparsers)
    args = parser.parse_args(argv)
    return run_reporting_errors(f"dia-diffusion {args.command}", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
