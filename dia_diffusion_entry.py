"""What every entry point runs before it imports `dia_diffusion`: the `dia-diffusion` console script,
train/train_ddpm.py and pipelines/sample.py.

Importing the package takes seconds (torch, diffusers). A Ctrl-C during them would end the command in a traceback of
the import machinery; inside `interrupted_quietly` it ends as a Ctrl-C does later: one line, exit status 130. This
module lies outside the package, since anything inside it would only run once the package had been imported.
"""

import sys
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command ended by Ctrl-C


@contextmanager
def interrupted_quietly(prog: str) -> Iterator[None]:
    """A KeyboardInterrupt inside the block prints `<prog>: interrupted` and exits with status 130."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None


def console_script() -> int:
    """The `dia-diffusion` command."""
    with interrupted_quietly("dia-diffusion"):
        from dia_diffusion.commands.cli import main

        return main()
