"""The `dia-diffusion` console script: one sub-command per tool, each defined in its own module."""

import argparse
import sys

from dia_diffusion import correlation, fid_command, heldout_loss, parameter_count

# Each module exposes `add_parser(subparsers)`, which registers its sub-commands and the function that runs them.
COMMANDS = (parameter_count, correlation, fid_command, heldout_loss)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dia-diffusion", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as error:
        # Bad input (a dataset spec, a path, an argument value) is reported as one line, not a traceback.
        print(f"dia-diffusion {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
