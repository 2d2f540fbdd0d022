"""Outputs that appear whole or not at all, and output paths checked before the work that fills them.

A file is written under a temporary name beside its target and renamed over it (`os.replace`, atomic on POSIX), so
a crash, a full disk or Ctrl-C leaves the previous file (or none) rather than a truncated one, and the temporary
file is removed on the way out; a folder is written beside its target and swapped in the same way. An output path
is checked before the work, which can take hours, not after.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

STAGING_PREFIX = ".staging-"


def staging_path(final_path: Path) -> Path:
    """The hidden sibling a checkpoint (or pipeline) is written into before it is published under its name."""
    return final_path.with_name(STAGING_PREFIX + final_path.name)


def prepare_staging(final_path: Path) -> Path:
    """Clears what a killed save may have left and returns the empty staging folder for `final_path`."""
    staging = staging_path(final_path)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


class OutputPathError(ValueError):
    """An output path that cannot be written as asked; the message is one line naming the flag."""


def check_output_path(path: Path, flag: str, folder: bool = False) -> None:
    """Refuses a path that cannot become the output: a folder where a file goes (or the reverse), or a place
    under a file or in a folder this process may not write."""
    if path.exists() and path.is_dir() != folder:
        raise OutputPathError(f"{flag} '{path}' is a {'file' if folder else 'folder'}")
    # The folder that will receive the output (a file is written beside it, then renamed) or its first
    # existing ancestor, where the missing folders will be made.
    receiver = path.absolute() if folder else path.absolute().parent
    ancestor = next(parent for parent in (receiver, *receiver.parents) if parent.exists())
    if not ancestor.is_dir():
        raise OutputPathError(f"{flag} '{path}' lies under '{ancestor}', which is a file")
    if not os.access(ancestor, os.W_OK):
        raise OutputPathError(f"{flag} '{path}' cannot be written: '{ancestor}' is read-only for this user")


def write_atomically(path: Path, write: Callable[[Path], None], suffix: str = "") -> None:
    """Calls `write(temporary)` for a temporary path beside `path` (ending in `suffix`, for writers that pick the
    format from it), then renames it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial{suffix}")
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def replace_folder(staging: Path, output: Path) -> None:
    """Renames the complete `staging` folder to `output`. A previous `output` is renamed aside first and deleted
    after, so `output` is always either the old folder or the new one (or, for an instant, absent)."""
    if output.exists():
        discard = output.with_name(f".discard-{output.name}")
        shutil.rmtree(discard, ignore_errors=True)
        os.rename(output, discard)
        os.rename(staging, output)
        shutil.rmtree(discard)
    else:
        os.rename(staging, output)
