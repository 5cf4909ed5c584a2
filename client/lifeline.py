"""Ends a daemon when the process that started it goes, SIGKILLed or not.

`shardps local` (and the test harness) reads each daemon's output from a pipe or socket whose
far end only it holds; when it dies, the kernel closes that end, and the daemon, watching its
own end, sends itself SIGTERM and shuts down as on any SIGTERM, instead of running on,
orphaned in a session of its own.
"""

from __future__ import annotations

import os
import select
import signal
import stat
import threading

_WATCHED = stat.S_ISFIFO, stat.S_ISSOCK


def watch(fd: int = 1) -> bool:
    """Starts a thread that SIGTERMs this process once the far end of `fd` (a pipe or socket
    this process writes to, never reads) is closed; False (nothing watched) when `fd` is a
    file or terminal, or the platform has no poll()."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    if not hasattr(select, "poll") or not any(kind(mode) for kind in _WATCHED):
        return False
    poller = select.poll()
    # A pipe's write end reports POLLERR once no reader is left; a socket, POLLHUP once its
    # peer has closed. Nothing else is asked for, so nothing else wakes the thread.
    poller.register(fd, select.POLLERR | select.POLLHUP)

    def wait_for_close() -> None:
        while not poller.poll():
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait_for_close, name="lifeline", daemon=True).start()
    return True
