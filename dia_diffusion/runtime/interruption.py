"""Stopping a run cleanly on Ctrl-C (SIGINT), SIGTERM or SIGHUP, and when its launcher goes away.

Inside `stop_on_signals()` those signals raise `RunInterrupted` in the main thread. A block that publishes files
(a checkpoint, the final pipeline) runs inside `deferred_interruption()`: a signal that arrives there is raised when
the block ends, so the stop never leaves a half-published folder. Signals after the first are ignored while the run
stops. `RunInterrupted` is a KeyboardInterrupt, which torch's DataLoader workers (they receive Ctrl-C too) already
leave to the main process.

`accelerate launch` with one process starts the training with `subprocess.Popen` and passes no SIGTERM on: killed,
it would leave the training running. `follow_launcher` asks Linux to send SIGTERM when the launcher dies
(prctl(PR_SET_PDEATHSIG), man 2 PR_SET_PDEATHSIG).
"""

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Set by accelerate's launchers and by torchrun for the processes they start; absent when a shell starts the script.
LAUNCHER_VARIABLES = ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID")
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class RunInterrupted(KeyboardInterrupt):
    """A stop signal arrived; `exit_status` follows the shell's convention, 128 + the signal number."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name

    @property
    def exit_status(self) -> int:
        return 128 + self.signal_number


class _StopState:
    received: int | None = None  # the first stop signal
    pending = False  # received inside a deferred block, not raised yet
    deferring = 0  # depth of deferred_interruption() blocks


_state = _StopState()


def _on_stop_signal(signal_number: int, frame) -> None:
    if _state.received is not None:
        return
    _state.received = signal_number
    if _state.deferring:
        _state.pending = True
    else:
        raise RunInterrupted(signal_number)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise RunInterrupted inside this block; the previous handlers come back after.

    Signal handlers belong to the main thread: elsewhere the block changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, _on_stop_signal) for number in STOP_SIGNALS}
    _state.received, _state.pending = None, False
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextmanager
def deferred_interruption() -> Iterator[None]:
    """Holds a stop signal back until the block has finished (an exception from the block still propagates)."""
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1
    if _state.pending and not _state.deferring:
        _state.pending = False
        raise RunInterrupted(_state.received)


def follow_launcher(launcher_pid: int, environ: Mapping[str, str] = os.environ) -> None:
    """When a launcher started this process, SIGTERM it as soon as the launcher dies (Linux only).

    `launcher_pid` is the parent's pid read at start-up: if the parent has changed since, the launcher died before
    the request, and the SIGTERM is sent now. A script started from a shell is left alone, so `nohup` keeps working.
    """
    if not sys.platform.startswith("linux") or not any(name in environ for name in LAUNCHER_VARIABLES):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != launcher_pid:
        signal.raise_signal(signal.SIGTERM)
