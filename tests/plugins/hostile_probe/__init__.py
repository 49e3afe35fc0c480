"""A hostile plug-in: every route a submitter could take out of the attack's process.

``Probe(route=...)`` tries one route in ``reconstruct`` and reports what it found in
``Reconstruction.info``; where the route hands it the private batch it returns it, otherwise
seeded noise. It never reads the ground truth through the protocol (it has none): anything it
finds, it found by escaping. The tests run it under ``sandbox`` (every route finds nothing) and
under ``process`` or ``in-process`` (the control: the route works, so the test can fail).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import torch

from leakbench import Attack, Capability, Reconstruction

TOKEN_BYTES = 4 << 20  # how much of one memory region the memory route scans at most


def _noise(observation: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(observation.seed)
    return torch.randn(observation.batch_size or 1, *observation.input_shape, generator=g)


def _writable(path: Path) -> bool:
    """Whether a file can be opened for appending (nothing is written) or a folder written to."""
    try:
        if path.is_dir():
            probe = path / f".hostile-{os.getpid()}"
            probe.write_text("hostile plug-in was here")
            probe.unlink()
        else:
            with open(path, "a"):
                pass
        return True
    except OSError:
        return False


def _visible_pids() -> list[int]:
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid())


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _scan_memory(pid: int, token: bytes) -> bool:
    maps = _read(f"/proc/{pid}/maps")
    if maps is None:
        return False
    try:
        memory = open(f"/proc/{pid}/mem", "rb", buffering=0)
    except OSError:
        return False
    with memory:
        for line in maps.decode(errors="replace").splitlines():
            fields = line.split()
            if len(fields) < 2 or not fields[1].startswith("rw"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                memory.seek(start)
                chunk = memory.read(min(end - start, TOKEN_BYTES))
            except (OSError, OverflowError, ValueError):
                continue
            if token in chunk:
                return True
    return False


class Probe(Attack):
    """Tries the route ``route``; ``paths``, ``port``, ``pid`` and ``token`` tell it where to
    look (a submitter would guess them; the tests hand them over to make the control exact)."""

    requires = frozenset({Capability.BATCH_SIZE})

    def __init__(
        self,
        route: str = "environ",
        paths: list[str] | None = None,
        port: int = 0,
        pid: int = 0,
        token: str = "",
        limit: int = 0,
    ) -> None:
        super().__init__(route=route, paths=paths, port=port, pid=pid, token=token, limit=limit)
        self.route, self.paths, self.port, self.pid = route, list(paths or []), port, pid
        self.token, self.limit = token, limit

    def reconstruct(self, observation: Any) -> Reconstruction:
        info = getattr(self, f"_{self.route.replace('-', '_')}")()
        return Reconstruction(images=_noise(observation), info=info)

    def _environ(self) -> dict[str, Any]:
        run_dir = os.environ.get("LEAKBENCH_RUN_DIR")
        wrote = None
        if run_dir and Path(run_dir).is_dir():
            target = Path(run_dir) / "hostile-was-here.txt"
            with contextlib.suppress(OSError):
                target.write_text("written by a hostile plug-in")
                wrote = str(target)
        return {"env_keys": sorted(os.environ), "run_dir": run_dir, "wrote": wrote}

    def _descriptors(self) -> dict[str, Any]:
        targets = {}
        for fd in sorted(int(fd) for fd in os.listdir("/proc/self/fd")):
            with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
                targets[str(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        return {"targets": targets}

    def _files(self) -> dict[str, Any]:
        seen = [p for p in self.paths if os.path.exists(p)]
        return {"seen": seen, "writable": [p for p in seen if _writable(Path(p))]}

    def _network(self) -> dict[str, Any]:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as connection:
                connection.sendall(b"hostile plug-in was here\n")
            return {"connected": True, "error": None}
        except OSError as exc:
            return {"connected": False, "error": str(exc)}

    def _processes(self) -> dict[str, Any]:
        pids = _visible_pids()
        environs = [_read(f"/proc/{p}/environ") for p in pids]
        commands = [
            (_read(f"/proc/{p}/cmdline") or b"").replace(b"\0", b" ").decode() for p in pids
        ]
        try:
            os.kill(self.pid, 0)
            signalled = True
        except OSError:
            signalled = False
        return {
            "pids": pids,
            "harness_visible": self.pid in pids,
            "signalled_harness": signalled,
            "environ_with_run_dir": sum(b"LEAKBENCH_RUN_DIR" in (e or b"") for e in environs),
            "commands": commands,
        }

    def _memory(self) -> dict[str, Any]:
        token = self.token.encode()
        found = [p for p in _visible_pids() if _scan_memory(p, token)]
        return {"token_found_in": found}

    def _fork_server(self) -> dict[str, Any]:
        """Connect to every Unix socket of the machine that multiprocessing made."""
        table = _read("/proc/net/unix") or b""
        paths = re.findall(rb"\s(/\S*pymp\S*)", table)
        connected = []
        for path in paths:
            with contextlib.suppress(OSError):
                client = socket.socket(socket.AF_UNIX)
                client.settimeout(1)
                client.connect(path.decode())
                client.close()
                connected.append(path.decode())
        return {"sockets": [p.decode() for p in paths], "connected": connected}

    def _orphan(self) -> dict[str, Any]:
        """Leave a grandchild behind that writes into ``paths[0]`` a second later."""
        pid = os.fork()
        if pid == 0:
            if os.fork() == 0:
                time.sleep(1.0)
                with contextlib.suppress(OSError):
                    Path(self.paths[0], "orphan-was-here.txt").write_text(str(os.getpid()))
            os._exit(0)
        os.waitpid(pid, 0)
        return {"left": True}

    def _memory_hog(self) -> dict[str, Any]:
        hoard = []
        while True:  # until the limit stops it: MemoryError fails the trial
            hoard.append(bytearray(256 << 20))

    def _fork_bomb(self) -> dict[str, Any]:
        children = 0
        try:
            while children < self.limit:
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                children += 1
        except OSError as exc:
            raise RuntimeError(f"fork bomb stopped after {children} processes: {exc}") from None
        return {"children": children}
