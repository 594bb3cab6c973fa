"""Model chat templates compiled and rendered in worker processes, under a time limit and a memory limit.

A chat template comes with a downloaded model, so it is untrusted code. Jinja's sandbox keeps it away from Python's
internals, but not from working forever or filling memory: a loop within a loop over `range(100000)`,
`'x'.center(50000000)`, or a filter that Jinja folds while compiling (`'x'|center(300000000)` takes 1.2 GB and
3 s before anything renders). Bounding each of those inside the sandbox is a list that never ends; a process can
be bounded whole. So camelid compiles and renders a model's own template in a worker process that it kills after
RENDER_SECONDS, that the kernel stops at WORKER_MEMORY bytes of address space, and whose text chat_template caps.
camelid's built-in templates, its own code, render in process.

A worker starts on first use (a Python with jinja2, ~0.2 s) and stays for the next render. A thread takes an idle
worker or starts one, so a slow render holds up only its own caller; a forked child starts its own.

The protocol is one JSON object a line each way: a request from camelid.chat_template, then its reply.
"""

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from camelid.errors import CamelidError

RENDER_SECONDS = 2.0  # a render or compile that takes longer is stopped (real templates take milliseconds)
WORKER_MEMORY = 1 << 30  # bytes of address space a worker may map (it needs ~60 MB)
START_SECONDS = 60.0  # a worker that is not ready after this is taken as broken (a slow CI machine may need 5 s)
MAX_IDLE = 8  # idle workers kept for the next renders
_READY = b'{"ready": true}\n'


class Stopped(Exception):
    """The worker ran past RENDER_SECONDS or died; it is gone and the request has no reply."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Worker:
    def __init__(self):
        package_root = str(Path(__file__).resolve().parents[1])  # so the child imports this camelid, however found
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", "camelid.template_worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONPATH": path})
        self._buffer = b""
        try:
            ready = self._line(time.monotonic() + START_SECONDS) == _READY.strip()
        except Stopped:
            ready = False
        if not ready:
            self.close()
            raise CamelidError("the chat template worker process did not start; check that this Python can "
                               f"run `{sys.executable} -m camelid.template_worker`")

    def ask(self, request: dict) -> dict:
        deadline = time.monotonic() + RENDER_SECONDS
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise Stopped(self._death()) from None
        return json.loads(self._line(deadline))

    def _line(self, deadline: float) -> bytes:
        """The next line the worker writes; Stopped if it writes none before `deadline` (it is killed) or dies."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.close()
                raise Stopped("time")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise Stopped(self._death())
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def _death(self) -> str:
        """Why the worker ended by itself: "memory" when a signal ended it (an allocation past its limit can abort
        it before Python sees a MemoryError), else its exit status."""
        code = self.proc.wait()
        self.close()
        return "memory" if code < 0 else f"exit {code}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


_idle: list[_Worker] = []
_owner = os.getpid()
_lock = threading.Lock()


def ask(request: dict) -> dict:
    """The reply of a worker to `request`; raises Stopped when it ran past RENDER_SECONDS or died."""
    global _idle, _owner
    with _lock:
        if _owner != os.getpid():  # forked: the parent's workers are the parent's
            _idle, _owner = [], os.getpid()
        worker = _idle.pop() if _idle else None
    worker = worker or _Worker()
    reply = worker.ask(request)  # a worker that raised is dead already
    if reply.get("error") == "memory":  # a MemoryError may leave it half-working
        worker.close()
        return reply
    with _lock:
        if _owner == os.getpid() and len(_idle) < MAX_IDLE:
            _idle.append(worker)
            worker = None
    if worker is not None:
        worker.close()
    return reply


@atexit.register
def _close_all() -> None:
    with _lock:
        workers = _idle[:] if _owner == os.getpid() else []
        _idle.clear()
    for worker in workers:
        worker.close()


def _serve() -> None:
    """The worker's loop: a request a line from stdin, its reply a line to stdout, until stdin closes."""
    import resource

    from camelid.chat_template import render_request

    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    out = sys.stdout.buffer
    out.write(_READY)
    out.flush()
    for line in sys.stdin.buffer:
        out.write(json.dumps(render_request(json.loads(line))).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    _serve()
