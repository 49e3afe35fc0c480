"""The process that runs inside an attack sandbox (:mod:`leakbench.protocol.sandbox`).

It is PID 1 of the sandbox's PID namespace. It imports torch and leakbench's own code once,
never an attack's plug-in module, then serves jobs one at a time:

1. read a job from the harness (standard input: one length-prefixed frame);
2. fork a child that drops its inherited channels (standard input becomes ``/dev/null``,
   standard output goes to standard error, every other descriptor but its answer pipe is
   closed), sets its resource limits, runs the job (:func:`leakbench.protocol.jobs.run_job`:
   only here is the attack's code imported and run) and writes its answer to its pipe;
3. read that answer, then kill every other process of the namespace (a double-forked child
   included: PID 1's ``kill(-1)`` reaches them all), reap them and empty ``/tmp`` and
   ``/dev/shm``, so that nothing of one job is left running or lying around for the next;
4. send the answer (``A`` + its bytes) or how the child died (``D`` + a text) to the harness on
   the descriptor it kept for that, which no child holds.

The zygote makes itself non-dumpable, so a child cannot trace it or read its memory and
descriptors through ``/proc``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import select
import shutil
import signal
import struct
import sys
from pathlib import Path

FRAME = struct.Struct(">Q")
MAX_ANSWER_BYTES = 4 << 30  # what one job may answer: far above a batch of 256 RGB images
PR_SET_PDEATHSIG, PR_SET_DUMPABLE = 1, 4
SCRATCH = ("/tmp", "/dev/shm")
LIMITS = {
    "memory_bytes": resource.RLIMIT_DATA,
    "cpu_seconds": resource.RLIMIT_CPU,
    "processes": resource.RLIMIT_NPROC,
    "open_files": resource.RLIMIT_NOFILE,
    "file_bytes": resource.RLIMIT_FSIZE,
}


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def die_with_parent() -> None:
    """Have this process killed (SIGKILL) when its parent ends: a job's process never outlives
    the process that waits for its answer. Linux only; elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def read_exactly(fd: int, size: int) -> bytes | None:
    """``size`` bytes from ``fd``, or None at end of file before them."""
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> bytes | None:
    header = read_exactly(fd, FRAME.size)
    if header is None:
        return None
    return read_exactly(fd, FRAME.unpack(header)[0])


def write_frame(fd: int, data: bytes) -> None:
    view = memoryview(FRAME.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _child(job: bytes, answer_fd: int) -> None:
    """Run one job in this forked child; never returns."""
    status = 1
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # the harness's job channel: the next jobs are none of its business
        os.dup2(2, 1)  # prints go to the sandbox's log, never into an answer
        os.closerange(3, answer_fd)
        os.closerange(answer_fd + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        die_with_parent()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        from leakbench.protocol.jobs import dumps, loads, run_job

        message = loads(job)
        for key, value in (message.get("limits") or {}).items():
            if value is not None:
                resource.setrlimit(LIMITS[key], (int(value), int(value)))
        write_frame(answer_fd, dumps(run_job(message)))
        status = 0
    finally:
        os._exit(status)


def exit_words(code: int | None) -> str:
    """How a process ended, from its exit code (negative: the signal that killed it)."""
    if code is not None and code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def _other_processes() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]


def _mount_points() -> list[Path]:
    with open("/proc/self/mountinfo") as table:
        return [Path(line.split()[4]) for line in table]


def clear_namespace() -> None:
    """Kill and reap every process of the namespace but this one; empty the scratch folders."""
    while True:
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            while True:
                os.waitpid(-1, 0)
        if not _other_processes():
            break
    mounted = _mount_points()
    for folder in map(Path, SCRATCH):
        if folder.is_dir():
            for entry in folder.iterdir():
                if any(m == entry or entry in m.parents for m in mounted):
                    continue  # a read-only folder the harness showed (a plug-in under /tmp)
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        entry.unlink()


def _collect(pid: int, answer_fd: int) -> tuple[bytes | None, str]:
    """The child's answer frame (None if it gave none) and how it ended."""
    data = bytearray()
    exited: int | None = None
    while True:
        ready, _, _ = select.select([answer_fd], [], [], 0.2)
        if ready:
            chunk = os.read(answer_fd, 1 << 20)
            if not chunk:
                break
            data += chunk
            if len(data) >= FRAME.size and len(data) - FRAME.size > MAX_ANSWER_BYTES:
                return None, f"its answer is larger than {MAX_ANSWER_BYTES >> 30} GiB"
            if len(data) >= FRAME.size and len(data) == FRAME.size + FRAME.unpack(data[:8])[0]:
                break
        elif exited is None:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                exited = status
                # A descendant may hold the pipe open: end it, so that the read sees the end.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(-1, signal.SIGKILL)
    if exited is None:
        with contextlib.suppress(ChildProcessError):
            exited = os.waitpid(pid, 0)[1]
    code = os.waitstatus_to_exitcode(exited) if exited is not None else None
    complete = len(data) >= FRAME.size and len(data) == FRAME.size + FRAME.unpack(data[:8])[0]
    return (bytes(data[FRAME.size :]) if complete else None), exit_words(code)


def serve(harness_fd: int) -> None:
    """Answer jobs from standard input until it closes."""
    while True:
        job = read_frame(0)
        if job is None:
            return
        answer_r, answer_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(answer_r)
            _child(job, answer_w)
        os.close(answer_w)
        answer, how = _collect(pid, answer_r)
        os.close(answer_r)
        clear_namespace()
        write_frame(harness_fd, b"A" + answer if answer is not None else b"D" + how.encode())


def main() -> None:
    """Entry point of the sandbox (after its bootstrap dropped privileges and set up ``site``)."""
    _prctl(PR_SET_DUMPABLE, 0)
    harness_fd = os.dup(1)  # answers to the harness; children never hold it
    os.dup2(2, 1)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # ended by the harness with SIGKILL only
    import leakbench.protocol.worker_preload  # noqa: F401  (torch and leakbench's own code)

    write_frame(harness_fd, b"R")  # ready
    serve(harness_fd)
    sys.exit(0)
