"""Run a command in a child process, so that an end no Python code can catch still ends in one line.

Ray's C++ client ends its whole process at once (`_exit(1)`, no exception, no atexit) when the Ray
node under it dies, for example when the head on this machine is killed: its next object-store call
fails with "the connection to the plasma store is failed. Terminate the process". The CLI runs a
Ray command in a child; when the child ends without saying its exit status, the parent says why.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

PR_SET_PDEATHSIG = 1  # prctl option: a signal the kernel sends the child when its parent dies
PR_SET_CHILD_SUBREAPER = 36  # prctl option: orphans below this process become its children
SI_USER = 0           # si_code of a signal sent with kill(); a terminal's Ctrl-C comes from the kernel
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run_in_child(body: Callable[[], int], explain: Callable[[int, int], str]) -> int:
    """Return `body()`'s exit status, run in a forked child.

    If the child ends without returning from `body` (native code ended its process, or a signal
    killed it), `explain(child_pid, exit_code)` gives the one-line reason printed after `error:`
    (exit_code is minus the signal's number for a signal), and the status is 2. Signals sent to
    this process with kill() are passed on to the child (a terminal's Ctrl-C reaches both already);
    if this process is killed, the child is too. No process the child started outlives it (a local
    Ray's daemons, which its end orphaned).
    """
    if not hasattr(os, "fork"):
        return body()
    sys.stdout.flush()
    sys.stderr.flush()
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    said_read, said_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(said_read)
        _die_with_parent()
        code = 1  # what an uncaught exception ends with
        try:
            code = body()
        finally:
            os.write(said_write, bytes([code & 0xFF]))
            os.close(said_write)
        return code
    os.close(said_write)
    status = _wait_passing_signals(pid)
    os.set_blocking(said_read, False)  # a grandchild that kept the pipe open must not hold this up
    try:
        said = os.read(said_read, 1)
    except BlockingIOError:
        said = b""
    os.close(said_read)
    _end_orphans()
    if said:
        return said[0]
    print(f"error: {explain(pid, os.waitstatus_to_exitcode(status))}", file=sys.stderr, flush=True)
    return 2


def _prctl(option: int, value: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, value)
    except (OSError, AttributeError):  # not Linux: the child may outlive a killed parent, or leave orphans
        pass


def _die_with_parent() -> None:
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _end_orphans(settle_seconds: float = 2.0) -> None:
    """Kill and reap the processes left to this one (a subreaper) by the child's end. A killed
    daemon's own children come next, so look again until none came for a moment."""
    deadline = time.monotonic() + settle_seconds
    while time.monotonic() < deadline:
        orphans = _children()
        for orphan in orphans:
            try:
                os.kill(orphan, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            if not orphans:
                return  # nothing left, and nothing can come: no child remains to orphan any
        time.sleep(0.05)


def _children() -> list[int]:
    me = str(os.getpid())
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _wait_passing_signals(pid: int) -> int:
    """Wait for the child; pass on signals that were sent to this process alone."""
    watched = {*FORWARDED, signal.SIGCHLD}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            info = signal.sigtimedwait(watched, 1.0)
            if info is not None and info.si_signo in FORWARDED and info.si_code == SI_USER:
                os.kill(pid, info.si_signo)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
