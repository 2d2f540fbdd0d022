"""How an error reaches the user: one line, naming the file or flag, never a traceback."""


def first_line(error: BaseException) -> str:
    """The first line of a library's error message (some run to paragraphs), or its type when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
