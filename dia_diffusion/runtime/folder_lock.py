"""One training at a time per output folder: the run holds an exclusive flock on `OUTPUT_DIR/.lock`.

The kernel releases the lock when its process ends, however it ends (SIGKILL included), so a lock never outlives
its holder. The file itself stays: deleting a lock file races with a process that has just opened it. On NFS, Linux
maps flock onto the server's byte-range locks, so the lock also holds between machines.
"""

import errno
import fcntl
import os
import socket
from pathlib import Path

LOCK_FILENAME = ".lock"


class FolderInUseError(ValueError):
    """Another process holds the folder, or the folder cannot be created or written; one line for the user."""


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


def lock_folder(folder: Path, flag: str = "--output_dir") -> FolderLock:
    """Creates `folder` if needed and locks it, or raises FolderInUseError naming `flag`, the folder and the holder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(folder / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise FolderInUseError(f"{flag} '{folder}' cannot be written: {error.strerror}") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = os.pread(descriptor, 256, 0).decode(errors="replace").strip() or "unknown"
        os.close(descriptor)
        if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise FolderInUseError(f"{flag} '{folder}' cannot be locked: {error.strerror}") from None
        raise FolderInUseError(
            f"{flag} '{folder}' is in use by another training (process {holder}); wait for it to end or "
            f"choose another {flag}"
        ) from None
    # Who holds it, for the message above; what a crashed holder left is harmless, only the lock counts.
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return FolderLock(descriptor)
