"""Where an attack's code runs: a sandbox, a worker process, or (for debugging) the harness.

The harness holds the private batch; the attack must only ever see the Observation. Every call
into attack code is a job of plain data (:mod:`leakbench.protocol.jobs`): describing a plug-in,
its client code, its reconstruction. Where the job runs is the run's ``isolation``:

* ``sandbox`` (the default where the machine can make one): bubblewrap namespaces, an
  unprivileged user, a read-only view of the Python environment and nothing of the harness's
  files, no network, rlimits (:mod:`leakbench.protocol.sandbox`). The client code, which sees
  the private batch, gets a fresh sandbox of its own for each trial;
* ``process``: a fresh worker process per job, forked from a clean *fork server* (a process
  started, not forked, before any trial, which imported torch and leakbench's own attacks but
  never a plug-in and never held a private batch). Frames, ``gc``, hooks and module state find
  nothing of the harness, but the worker is an ordinary process of the same user, with the same
  files and ``/proc``: it is not a sandbox;
* ``in-process``: the same job in the harness's own process, for debugging and for measuring
  what isolation costs; it isolates nothing.

Plain data crosses the boundary both ways (``torch.save``, read with ``weights_only=True``). A job
that raises, dies (crash, out of memory), hangs past the trial's wall-clock limit or answers
something that is not what was asked for fails its trial with the reason; the run goes on. An
exception that passes through a wait (Ctrl-C, a signal the runner turns into one) ends the
worker or sandbox before it propagates. Every trial record names the mode it ran in.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from leakbench.cores import default_threads
from leakbench.protocol.jobs import (
    dumps,
    loads,
    peak_memory,
    plain_to_reconstruction,
    run_job,
)
from leakbench.protocol.sandbox import SandboxError, SandboxTimeout, SandboxView, run_in_sandbox
from leakbench.protocol.victim import Victim
from leakbench.protocol.zygote import die_with_parent, exit_words
from leakbench.threat_model import Budget, Reconstruction

ISOLATION_MODES = ("sandbox", "process", "in-process")
# Time a worker may take to start and load the attack's module, on top of the trial's limit.
WORKER_START_ALLOWANCE_S = 30.0
# Per-job rlimits in the sandbox (the zygote sets them before the attack's code loads).
SANDBOX_PROCESSES = 128  # processes and threads of the sandbox's user
SANDBOX_MEMORY_SHARE = 0.75  # of this machine's memory, per process of a job
SANDBOX_OPEN_FILES = 1024
SANDBOX_FILE_BYTES = 1 << 30


@dataclass
class AttackOutcome:
    """What came back from one ``reconstruct`` call."""

    reconstruction: Reconstruction | None
    error: str | None
    timed_out: bool
    usage: dict[str, Any]
    memory: dict[str, float | None] | None = None


@dataclass(frozen=True)
class Placement:
    """Where a run's attack jobs go: the mode, its threads and, for ``sandbox``, the view."""

    isolation: str = "sandbox"
    threads: int = 1
    view: SandboxView | None = None

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"unknown isolation mode {self.isolation!r}; valid: {ISOLATION_MODES}")
        if self.isolation == "sandbox" and self.view is None:
            raise ValueError("isolation 'sandbox' needs a SandboxView")


def sandbox_limits(max_seconds: float | None, threads: int) -> dict[str, int | None]:
    """The rlimits of one sandboxed job: memory per process (a share of this machine's), CPU
    seconds (the wall-clock limit on every thread, plus the start allowance)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu = (
        None if max_seconds is None else (max_seconds + WORKER_START_ALLOWANCE_S) * max(threads, 1)
    )
    return {
        "memory_bytes": int(memory * SANDBOX_MEMORY_SHARE),
        "cpu_seconds": None if cpu is None else int(cpu) + 1,
        "processes": SANDBOX_PROCESSES,
        "open_files": SANDBOX_OPEN_FILES,
        "file_bytes": SANDBOX_FILE_BYTES,
    }


def observation_payload(
    *,
    victim: Victim,
    client_mode: str,
    update: dict[str, torch.Tensor],
    input_shape: tuple[int, ...],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    budget: Budget,
    seed: int,
    batch_size: int | None,
    labels: torch.Tensor | None,
    client_state: Any,
    device: str = "cpu",
    client_protocol: dict[str, Any] | None = None,
    batchnorm_statistics: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Everything the attacker may see, as plain data (copies on the CPU, never references);
    ``device`` is where the attack's tensors go (the device the client trained on)."""
    return {
        "device": device,
        "victim": victim.spec(),
        "client_mode": client_mode,
        "update": {name: g.detach().cpu().clone() for name, g in update.items()},
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "mean": list(mean),
        "std": list(std),
        "budget": budget.to_dict(),
        "seed": seed,
        "batch_size": batch_size,
        "labels": None if labels is None else labels.detach().cpu().clone(),
        "client_state": client_state,
        # Plain data (names and numbers), as granted: see threat_model.protocol_view.
        "client_protocol": dict(client_protocol or {"name": "fedsgd"}),
        # Capability.BATCHNORM_STATISTICS: per BatchNorm layer, {"mean", "var"} (CPU copies).
        "batchnorm_statistics": None
        if batchnorm_statistics is None
        else {
            layer: {key: t.detach().cpu().clone() for key, t in stats.items()}
            for layer, stats in batchnorm_statistics.items()
        },
    }


def run_attack_job(
    label: str,
    message: dict[str, Any],
    placement: Placement,
    max_seconds: float | None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Run one job of attack ``label`` where ``placement`` says; its reply (``result`` or
    ``error``, and what it used), with ``timed_out`` set when it ran past its limit."""
    message = {**message, "threads": placement.threads}
    if placement.isolation == "in-process":
        return loads(dumps(run_job(loads(dumps(message)))))  # the same round trip as a worker's
    limit = None if max_seconds is None else max_seconds + WORKER_START_ALLOWANCE_S
    if placement.isolation == "process":
        # The fork server's path is the harness's when it started: a plug-in found on the path
        # since then is found by the worker too.
        return _in_worker({**message, "sys_path": list(sys.path)}, limit, max_seconds)
    assert placement.view is not None
    message.update(
        sys_path=list(placement.view.sys_path),
        limits=sandbox_limits(max_seconds, placement.threads),
    )
    started = time.perf_counter()
    try:
        answer, how = run_in_sandbox(
            dumps(message), label=label, view=placement.view, timeout=limit, fresh=fresh
        )
    except SandboxTimeout:
        return _timed_out(max_seconds, time.perf_counter() - started, "the sandbox was ended")
    except SandboxError as exc:
        return {"error": f"the attack's sandbox failed: {exc}", "usage": _used(started)}
    if answer is None:
        return {
            "error": f"the attack's sandboxed process died without answering ({how})",
            "usage": _used(started),
        }
    return _read_answer(answer, started)


def reconstruct(
    label: str,
    target: dict[str, Any],
    hparams: dict[str, Any],
    payload: dict[str, Any],
    placement: Placement,
    max_seconds: float | None,
) -> AttackOutcome:
    """Run the attack's ``reconstruct`` on the observation the payload describes."""
    message = {"kind": "reconstruct", "target": target, "hparams": hparams, "payload": payload}
    reply = run_attack_job(label, message, placement, max_seconds)
    usage = reply.get("usage") or {"iterations": None, "seconds": None}
    if reply.get("timed_out"):
        return AttackOutcome(None, reply["error"], True, usage)
    if "error" in reply:
        return AttackOutcome(None, str(reply["error"]), False, usage, reply.get("memory"))
    if max_seconds is not None and usage.get("seconds", 0.0) > max_seconds:
        return AttackOutcome(None, _timeout_message(max_seconds), True, usage, reply.get("memory"))
    return AttackOutcome(
        plain_to_reconstruction(reply["result"]), None, False, usage, reply.get("memory")
    )


def _timeout_message(max_seconds: float) -> str:
    return f"timeout: the attack ran past the trial's wall-clock limit of {max_seconds:g} s"


def _timed_out(max_seconds: float | None, seconds: float, how: str) -> dict[str, Any]:
    return {
        "error": _timeout_message(max_seconds or 0.0) + f" ({how})",
        "timed_out": True,
        "usage": {"iterations": None, "seconds": seconds},
    }


def _used(started: float) -> dict[str, Any]:
    return {"iterations": None, "seconds": time.perf_counter() - started}


def _read_answer(answer: bytes, started: float) -> dict[str, Any]:
    try:
        reply = loads(answer)
    except Exception as exc:
        from leakbench.protocol.jobs import describe_exception

        return {"error": f"unreadable answer from the worker: {describe_exception(exc)}",
                "usage": _used(started)}  # fmt: skip
    if not isinstance(reply, dict) or not ({"result", "error"} & set(reply)):
        return {"error": "unreadable answer from the worker: not a job reply",
                "usage": _used(started)}  # fmt: skip
    return reply


def _worker_main(connection: Any, request: bytes) -> None:
    """Entry point of a worker process: read the job, run it, send the reply. The worker ends
    with its parent, the fork server, which ends with the harness."""
    die_with_parent()
    if os.getppid() == 1:  # the fork server ended before the line above: nobody waits for us
        os._exit(1)
    connection.send_bytes(dumps(run_job(loads(request))))


_CONTEXT: Any = None


def worker_context() -> Any:
    """The fork-server context, started once per process with leakbench's own code preloaded."""
    global _CONTEXT
    if _CONTEXT is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["leakbench.protocol.worker_preload"])
        _CONTEXT = context
    return _CONTEXT


def _in_worker(message: dict[str, Any], limit: float | None, max_seconds: float | None) -> dict:
    context = worker_context()
    receiver, sender = context.Pipe(duplex=False)
    worker = context.Process(target=_worker_main, args=(sender, dumps(message)), daemon=True)
    started = time.perf_counter()
    worker.start()
    sender.close()  # so that a dead worker reads as end-of-file here
    answered = False
    try:
        if not receiver.poll(limit):
            return _timed_out(max_seconds, time.perf_counter() - started, "the worker was stopped")
        try:
            data = receiver.recv_bytes()
        except EOFError:
            worker.join()
            return {
                "error": "the attack's worker process died without answering "
                f"({exit_words(worker.exitcode)})",
                "usage": _used(started),
            }
        answered = True
        return _read_answer(data, started)
    finally:
        # Whatever happened (an answer, a timeout, Ctrl-C), the worker ends with the call; one
        # that answered may take a moment to exit, one that did not is stopped at once.
        receiver.close()
        worker.join(timeout=10 if answered else 0)
        if worker.is_alive():
            worker.kill()
            worker.join()


__all__ = [
    "ISOLATION_MODES",
    "AttackOutcome",
    "Placement",
    "default_threads",
    "observation_payload",
    "peak_memory",
    "reconstruct",
    "run_attack_job",
]
