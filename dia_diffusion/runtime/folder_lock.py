"""One writer at a time per output: the writer holds an exclusive flock on a lock file.

A training locks `OUTPUT_DIR/.lock`, inside the folder it fills. A command whose output is replaced whole (a folder
swapped in, a file renamed over, a set of files moved in together) locks `.<name>.lock` beside it, since a lock
inside would be swapped away with the output; its staging area is then its own.

The kernel releases the lock when its process ends, however it ends (SIGKILL included), so a lock never outlives
its holder. The file itself stays: deleting a lock file races with a process that has just opened it. On NFS, Linux
maps flock onto the server's byte-range locks, so the lock also holds between machines.
"""

import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import Any

LOCK_FILENAME = ".lock"


class FolderInUseError(ValueError):
    """Another process holds the output, or it cannot be created or written; one line for the user."""


class FolderLock:
    """Holds the lock until `release()` (or the end of the process)."""

    def __init__(self, descriptor: int) -> None:
        self.descriptor = descriptor

    def release(self) -> None:
        if self.descriptor < 0:
            return
        # LOCK_UN first: DataLoader workers forked meanwhile share the descriptor, and closing alone would leave the
        # lock held until they exit.
        fcntl.flock(self.descriptor, fcntl.LOCK_UN)
        os.close(self.descriptor)
        self.descriptor = -1


def output_lock_path(output: Path) -> Path:
    """The lock file of an output that is replaced whole: `.<name>.lock` beside it."""
    return output.with_name(f".{output.name}.lock")


def in_use(flag: str, target: Path, holder: str, user: str) -> FolderInUseError:
    return FolderInUseError(
        f"{flag} '{target}' is in use by another {user} (process {holder}); wait for it to end or choose "
        f"another {flag}"
    )


def take_lock(lock_file: Path, flag: str, target: Path, user: str) -> FolderLock:
    """Locks `lock_file` (created with its folder if needed), or raises FolderInUseError naming `flag`, `target`
    and the holder; `user` says what the holder is doing ("training", "sample.py")."""
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise FolderInUseError(f"{flag} '{target}' cannot be written: {error.strerror}") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = os.pread(descriptor, 256, 0).decode(errors="replace").strip() or "unknown"
        os.close(descriptor)
        if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise FolderInUseError(f"{flag} '{target}' cannot be locked: {error.strerror}") from None
        raise in_use(flag, target, holder, user) from None
    # Who holds it, for the message above; what a crashed holder left is harmless, only the lock counts.
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return FolderLock(descriptor)


def check_unlocked(lock_file: Path, flag: str, target: Path, user: str) -> None:
    """Raises FolderInUseError when another process holds `lock_file` now, without creating or taking it, so a
    command refuses before its expensive loading rather than after. A shared probe: processes of one launch that
    probe at once do not refuse each other."""
    try:
        descriptor = os.open(lock_file, os.O_RDONLY)
    except OSError:
        return  # no lock file: nobody holds it (and creating it is the real lock's business)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(descriptor, fcntl.LOCK_UN)
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            holder = os.pread(descriptor, 256, 0).decode(errors="replace").strip() or "unknown"
            raise in_use(flag, target, holder, user) from None
    finally:
        os.close(descriptor)


def lock_folder(folder: Path, flag: str = "--output_dir") -> FolderLock:
    """Creates `folder` if needed and locks it for a training, or raises FolderInUseError."""
    return take_lock(folder / LOCK_FILENAME, flag, folder, "training")


def lock_output(output: Path, flag: str, user: str, state: Any = None) -> FolderLock | None:
    """Locks an output that is replaced whole, through the lock file beside it.

    With an accelerate `state` of several processes, the main process locks (and gets the lock, the others None),
    and every process raises FolderInUseError when it could not: none is left waiting for the others.
    """
    if state is None or state.num_processes == 1:
        return take_lock(output_lock_path(output), flag, output, user)
    from accelerate.utils import broadcast_object_list

    lock, refusal = None, [""]
    if state.is_main_process:
        try:
            lock = take_lock(output_lock_path(output), flag, output, user)
        except FolderInUseError as error:
            refusal = [str(error)]
    broadcast_object_list(refusal)
    if refusal[0]:
        raise FolderInUseError(refusal[0])
    return lock
