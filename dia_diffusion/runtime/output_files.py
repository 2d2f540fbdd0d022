"""Outputs that appear whole or not at all, and output paths checked before the work that fills them.

A file is written under a temporary name beside its target and renamed over it (`os.replace`, atomic on POSIX), so
a crash, a full disk or Ctrl-C leaves the previous file (or none) rather than a truncated one, and the temporary
file is removed on the way out; a folder is written beside its target and swapped in the same way. An output path
is checked before the work, which can take hours, not after. A write that fails names its file, and says so when
the disk is full.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dia_diffusion.runtime.errors import first_line
from dia_diffusion.runtime.interruption import deferred_interruption

STAGING_PREFIX = ".staging-"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How writers report a failed write: torch with a RuntimeError of its own, the others with OSError.
WRITE_ERRORS = (OSError, RuntimeError)


class OutputWriteError(OSError):
    """A file or folder could not be written (a full disk, lost permissions); one line naming it."""


def write_error(path: Path, error: BaseException) -> OutputWriteError:
    """The one line for a failed write of `path`: the reason, and what to do when the disk is full."""
    if isinstance(error, OutputWriteError):
        return error
    reason = error.strerror if isinstance(error, OSError) and error.strerror else first_line(error)
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        reason += " (the disk is full: free space, then run the command again)"
    return OutputWriteError(f"'{path}' could not be written: {reason}")


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
    format from it), then renames it to `path`. A failed write raises OutputWriteError naming `path`."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial{suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(partial)
        os.replace(partial, path)
    except WRITE_ERRORS as error:
        partial.unlink(missing_ok=True)
        raise write_error(path, error) from None
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


def move_into(staging: Path, folder: Path, last: str) -> None:
    """Moves every entry of the complete `staging` folder into `folder` (which may hold other files), replacing
    entries of the same name, and removes `staging`. `last` is the entry that says the set is complete (a
    pipeline's model_index.json, correlation.json): it is removed first and moved in last, so `folder` never shows
    it beside a partial or mixed set."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / last).unlink(missing_ok=True)
    for entry in staging.iterdir():
        if entry.name == last:
            continue
        target = folder / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    os.replace(staging / last, folder / last)
    staging.rmdir()


def write_file_set(folder: Path, writers: dict[str, Callable[[Path], None]], last: str) -> None:
    """Writes the files `writers` names (each `writer(path)` writes one) into the hidden sibling of `folder`, then
    moves them into `folder` together (`move_into`; a stop signal waits until they are all in). A failure leaves
    `folder` as it was and raises OutputWriteError naming the file. The caller holds `folder`'s output lock, so
    the staging folder is its own."""
    staging = prepare_staging(folder.absolute())
    try:
        for name, write in writers.items():
            try:
                write(staging / name)
            except WRITE_ERRORS as error:
                raise write_error(folder / name, error) from None
        with deferred_interruption():
            move_into(staging, folder, last)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def new_entries_removed_on_failure(folder: Path, keep: tuple[str, ...] = ()) -> Iterator[None]:
    """What the block adds to `folder` is removed again when the block fails, so a start that fails (a full disk,
    Ctrl-C) leaves the folder as it found it; entries named in `keep` (a lock file) stay."""
    before = {entry.name for entry in folder.iterdir()} if folder.is_dir() else set()
    try:
        yield
    except BaseException:
        for entry in folder.iterdir() if folder.is_dir() else ():
            if entry.name in before or entry.name in keep:
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        raise
