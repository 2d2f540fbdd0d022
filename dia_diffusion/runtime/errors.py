"""How an error reaches the user: one line, naming the file or flag, never a traceback."""

import os
import sys


def first_line(error: BaseException) -> str:
    """The first line of a library's error message (some run to paragraphs), or its type when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def print_once(line: str) -> None:
    """Prints `line` on stderr from the first process of a launch only (torchrun and accelerate set RANK): every
    process meets the same error, and one line is enough."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)
