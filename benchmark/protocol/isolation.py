"""Runs an attack's ``reconstruct`` where it cannot reach the harness: a fresh worker process.

The harness holds the private batch; the attack must only ever see the Observation. In the
default ``process`` mode each trial's attack runs in a new process forked from a clean
*fork server*: a process started (not forked) from this one before any trial, which has
imported torch and the registered components but never held a private batch. So frame
walking, ``gc.get_objects()``, hooks planted on shared models and module-level state find
nothing of the harness, and nothing survives from one trial to the next.

What crosses the process boundary is plain data, serialised with ``torch.save`` and read with
``torch.load(weights_only=True)`` in both directions: the victim's specification and state, the
shared update, the granted metadata, the budget, the attacker's seed, the attack class's import
path and its hyperparameters; back come the reconstruction's tensors and its JSON diagnostics.
A hostile answer can therefore not run code in the harness when it is read.

A worker that raises, dies (crash, out of memory), hangs past the trial's wall-clock limit or
answers something that is not a :class:`Reconstruction` fails that trial with the reason; the
run goes on. ``in-process`` mode runs the same steps in the harness's own process, for
debugging and for measuring what the isolation costs; it isolates nothing, and every trial
record names the mode it ran in.
"""

from __future__ import annotations

import copy
import importlib
import io
import json
import multiprocessing
import os
import resource
import signal
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from leakbench.protocol.victim import Victim
from leakbench.threat_model import Budget, BudgetMeter, Observation, Reconstruction

ISOLATION_MODES = ("process", "in-process")
# Time a worker may take to start and load the attack's module, on top of the trial's limit.
WORKER_START_ALLOWANCE_S = 30.0


@dataclass
class AttackOutcome:
    """What came back from one ``reconstruct`` call."""

    reconstruction: Reconstruction | None
    error: str | None
    timed_out: bool
    usage: dict[str, Any]
    memory: dict[str, float | None] | None = None


def peak_memory() -> dict[str, float | None]:
    """Peak resident memory of this process so far (MiB) and, where there is a GPU, the peak
    GPU memory torch allocated."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"peak_rss_mb": rss, "gpu_peak_mb": gpu}


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
        "client_protocol": copy.deepcopy(client_protocol or {"name": "fedsgd"}),
        # Capability.BATCHNORM_STATISTICS: per BatchNorm layer, {"mean", "var"} (CPU copies).
        "batchnorm_statistics": None
        if batchnorm_statistics is None
        else {
            layer: {key: t.detach().cpu().clone() for key, t in stats.items()}
            for layer, stats in batchnorm_statistics.items()
        },
    }


def observation_from_payload(payload: dict[str, Any]) -> Observation:
    """The attacker's :class:`Observation`, built from scratch out of the payload."""
    device = torch.device(payload["device"])
    model = Victim.from_spec(payload["victim"]).build().to(device)
    model.train(payload["client_mode"] == "train")
    labels = payload["labels"]
    statistics = payload.get("batchnorm_statistics")
    return Observation(
        model=model,
        update={name: g.to(device) for name, g in payload["update"].items()},
        input_shape=tuple(payload["input_shape"]),
        num_classes=payload["num_classes"],
        mean=tuple(payload["mean"]),
        std=tuple(payload["std"]),
        budget=BudgetMeter(Budget(**payload["budget"])),
        seed=payload["seed"],
        batch_size=payload["batch_size"],
        labels=None if labels is None else labels.to(device),
        client_state=payload["client_state"],
        client_protocol=payload.get("client_protocol") or {"name": "fedsgd"},
        batchnorm_statistics=None
        if statistics is None
        else {
            layer: {key: t.to(device) for key, t in stats.items()}
            for layer, stats in statistics.items()
        },
    )


def reconstruct(
    attack_cls: type,
    hparams: dict[str, Any],
    payload: dict[str, Any],
    *,
    isolation: str,
    max_seconds: float | None,
    threads: int,
) -> AttackOutcome:
    """Run ``attack_cls(**hparams).reconstruct`` on the observation the payload describes."""
    if isolation == "in-process":
        outcome = _reconstruct_here(attack_cls, hparams, payload)
    elif isolation == "process":
        outcome = _reconstruct_in_worker(attack_cls, hparams, payload, max_seconds, threads)
    else:
        raise ValueError(f"unknown isolation mode {isolation!r}; valid: {ISOLATION_MODES}")
    if outcome.error is None and max_seconds is not None:
        if outcome.usage.get("seconds", 0.0) > max_seconds:
            message = _timeout_message(max_seconds)
            return AttackOutcome(None, message, True, outcome.usage, outcome.memory)
    return outcome


def _timeout_message(max_seconds: float) -> str:
    return f"timeout: the attack ran past the trial's wall-clock limit of {max_seconds:g} s"


def _describe(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _reconstruct_here(
    attack_cls: type, hparams: dict[str, Any], payload: dict[str, Any]
) -> AttackOutcome:
    reply = _answer(attack_cls, hparams, observation_from_payload(payload))
    return _outcome(_loads(_dumps(reply)), reply["usage"])  # the same round trip as a worker's


def _answer(attack_cls: type, hparams: dict[str, Any], observation: Observation) -> dict[str, Any]:
    """Run the attack; its answer, or its error, as plain data with what it used."""
    try:
        reply = {"result": _answer_to_plain(attack_cls(**hparams).reconstruct(observation))}
    except Exception as exc:  # a failing attack fails its trial, never the run
        reply = {"error": _describe(exc)}
    reply.update(usage=observation.budget.usage(), memory=peak_memory())
    return reply


def _outcome(reply: dict[str, Any], usage: dict[str, Any]) -> AttackOutcome:
    usage = reply.get("usage", usage)
    if "error" in reply:
        return AttackOutcome(None, str(reply["error"]), False, usage, reply.get("memory"))
    return AttackOutcome(_plain_to_answer(reply["result"]), None, False, usage, reply["memory"])


def _answer_to_plain(answer: Any) -> dict[str, Any]:
    """A Reconstruction as plain data; anything else is refused with what was expected."""
    if not isinstance(answer, Reconstruction):
        raise TypeError(f"reconstruct returned {type(answer).__name__}, expected a Reconstruction")
    if not isinstance(answer.images, torch.Tensor):
        raise TypeError(f"Reconstruction.images is {type(answer.images).__name__}, not a tensor")
    if answer.labels is not None and not isinstance(answer.labels, torch.Tensor):
        raise TypeError(f"Reconstruction.labels is {type(answer.labels).__name__}, not a tensor")
    try:
        info = json.loads(json.dumps(answer.info, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"Reconstruction.info is not JSON-serialisable: {exc}") from None
    return {
        "images": answer.images.detach().cpu().clone(),
        "labels": None if answer.labels is None else answer.labels.detach().cpu().clone(),
        "batch_size": None if answer.batch_size is None else int(answer.batch_size),
        "info": info,
    }


def _plain_to_answer(plain: dict[str, Any]) -> Reconstruction:
    return Reconstruction(
        images=plain["images"],
        labels=plain["labels"],
        batch_size=plain["batch_size"],
        info=plain["info"],
    )


def _dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def _worker_main(connection: Any, request: bytes) -> None:
    """Entry point of a worker process: read the request, run the attack, send the answer."""
    try:
        message = _loads(request)
        torch.set_num_threads(message["threads"])
        module, _, qualname = message["attack"].partition(":")
        attack_cls: Any = importlib.import_module(module)
        for part in qualname.split("."):
            attack_cls = getattr(attack_cls, part)
        observation = observation_from_payload(message["payload"])
    except Exception as exc:
        hint = "attack classes must be importable by module and name in a fresh process"
        connection.send_bytes(_dumps({"error": f"worker setup failed ({hint}): {_describe(exc)}"}))
        return
    connection.send_bytes(_dumps(_answer(attack_cls, message["hparams"], observation)))


_CONTEXT: Any = None


def worker_context() -> Any:
    """The fork-server context, started once per process with the components preloaded."""
    global _CONTEXT
    if _CONTEXT is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["leakbench.protocol.worker_preload"])
        _CONTEXT = context
    return _CONTEXT


def _reconstruct_in_worker(
    attack_cls: type,
    hparams: dict[str, Any],
    payload: dict[str, Any],
    max_seconds: float | None,
    threads: int,
) -> AttackOutcome:
    request = _dumps(
        {
            "attack": f"{attack_cls.__module__}:{attack_cls.__qualname__}",
            "hparams": hparams,
            "payload": payload,
            "threads": threads,
        }
    )
    context = worker_context()
    receiver, sender = context.Pipe(duplex=False)
    worker = context.Process(target=_worker_main, args=(sender, request), daemon=True)
    start = time.perf_counter()
    worker.start()
    sender.close()  # so that a dead worker reads as end-of-file here
    limit = None if max_seconds is None else max_seconds + WORKER_START_ALLOWANCE_S
    try:
        if not receiver.poll(limit):
            worker.kill()
            worker.join()
            seconds = time.perf_counter() - start
            message = _timeout_message(max_seconds or 0.0) + " (the worker was stopped)"
            return AttackOutcome(None, message, True, {"iterations": None, "seconds": seconds})
        try:
            reply = _loads(receiver.recv_bytes())
        except EOFError:
            worker.join()
            return AttackOutcome(
                None,
                f"the attack's worker process died without answering ({_exit(worker.exitcode)})",
                False,
                {"iterations": None, "seconds": time.perf_counter() - start},
            )
        except Exception as exc:
            worker.kill()
            worker.join()
            return AttackOutcome(
                None,
                f"unreadable answer from the worker: {_describe(exc)}",
                False,
                {"iterations": None, "seconds": time.perf_counter() - start},
            )
    finally:
        receiver.close()
    worker.join(timeout=10)
    if worker.is_alive():  # answered but does not exit (a thread left running): stop it
        worker.kill()
        worker.join()
    return _outcome(reply, {"iterations": None, "seconds": time.perf_counter() - start})


def _exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def default_threads(processes: int = 1) -> int:
    """The cores of this machine divided among ``processes`` processes (at least 1 each)."""
    return max(1, (os.cpu_count() or 1) // max(1, processes))
