"""The attack code a trial runs, as jobs of plain data: where the attack's code runs, this is all
that runs.

Four kinds of job cross the boundary between the harness and the attack's code, in a sandbox,
a worker process or (for debugging) in the harness itself (:mod:`leakbench.protocol.isolation`):

* ``describe``: build the attack from its options and answer what the harness needs to know
  before any trial (its hyperparameters as rebuilt, its requirements, threat model, batch-size
  limit, client protocols) and whether it can handle the victim (``check_model``). A plug-in
  is never imported by the harness: this answer is how the harness learns about it;
* ``client_hook``: the attack's client code, on the client's model and private batch, where the
  run grants ``client_code``; it returns the batch the client trains on, the state that travels
  to the server and its report;
* ``server_model``: the attack's server code, where the run grants ``server_model``: on the
  victim's name, options and state (and the surrogate data, where granted) it returns the model
  the server sends instead, as a zoo name, JSON options and a state of tensors;
* ``reconstruct``: the attack on the server's Observation.

A message names the attack by where it lives: a module and a class (built-in attacks, and
classes a user registered in their own process), or a ``leakbench.attacks`` entry point of an
installed distribution (plug-ins), which is only ever loaded here. Messages and answers are
plain data serialised with ``torch.save`` and read with ``torch.load(weights_only=True)``, so
that reading a hostile answer cannot run code.
"""

from __future__ import annotations

import copy
import importlib
import io
import json
import resource
import sys
import traceback
from collections.abc import Mapping
from importlib.metadata import EntryPoint
from typing import Any

import torch

from leakbench.protocol.victim import Victim
from leakbench.threat_model import (
    Budget,
    BudgetMeter,
    ClientContext,
    Observation,
    Reconstruction,
    ServerContext,
)

JOB_KINDS = ("describe", "client_hook", "server_model", "reconstruct")


def dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def describe_exception(exc: BaseException) -> str:
    """``Type: message (file:line)`` of where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def peak_memory() -> dict[str, float | None]:
    """Peak resident memory of this process so far (MiB) and, where there is a GPU, the peak
    GPU memory torch allocated."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"peak_rss_mb": rss, "gpu_peak_mb": gpu}


def attack_class(target: Mapping[str, Any]) -> type:
    """The attack class a message names: ``{"module", "qualname"}``, or ``{"entry_point":
    {"name", "value"}}`` whose module registers (or whose object is) the attack."""
    if "entry_point" in target:
        from leakbench.registry import ATTACKS

        ep = target["entry_point"]
        loaded = EntryPoint(ep["name"], ep["value"], "leakbench.attacks").load()
        if isinstance(loaded, type):
            return loaded
        registered = ATTACKS._items.get(ep["name"])
        if registered is None:
            raise LookupError(
                f"the entry point {ep['name']} = {ep['value']} registers no attack named "
                f"{ep['name']!r}: a module entry point must register its attack under the "
                "entry point's name"
            )
        return registered
    cls: Any = importlib.import_module(target["module"])
    for part in target["qualname"].split("."):
        cls = getattr(cls, part)
    return cls


def observation_from_payload(payload: Mapping[str, Any]) -> Observation:
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


def json_data(value: Any, what: str) -> Any:
    """``value`` as JSON data, or a TypeError naming ``what`` is not."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} is not JSON data: {exc}") from None


def reconstruction_to_plain(answer: Any) -> dict[str, Any]:
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


def plain_to_reconstruction(plain: Mapping[str, Any]) -> Reconstruction:
    return Reconstruction(
        images=plain["images"],
        labels=plain["labels"],
        batch_size=plain["batch_size"],
        info=plain["info"],
    )


def _describe(message: Mapping[str, Any]) -> dict[str, Any]:
    from leakbench.registry import attack_facts

    cls = attack_class(message["target"])
    try:
        attack = cls(**message["options"])
    except TypeError as exc:
        return {"options_error": str(exc)}
    model_error = None
    if message.get("victim") is not None:
        try:
            attack.check_model(Victim.from_spec(message["victim"]).build())
        except ValueError as exc:  # UnsupportedModelError and its kin
            model_error = str(exc)
    return {
        **attack_facts(attack),
        "hparams": json_data(dict(attack.hparams), "the attack's hyperparameters"),
        "qualname": f"{cls.__module__}:{cls.__qualname__}",
        "protocol_requires": {
            name: sorted(getattr(c, "value", c) for c in caps)
            for name, caps in dict(getattr(cls, "protocol_requires", {}) or {}).items()
        },
        "model_error": model_error,
    }


def _client_hook(message: Mapping[str, Any]) -> dict[str, Any]:
    cls = attack_class(message["target"])
    model = Victim.from_spec(message["victim"]).build()
    model.train(message["client_mode"] == "train")
    images = message["images"]
    context = ClientContext(**message["context"], budget=Budget(**message["budget"]))
    trained, state = cls(**message["hparams"]).client_hook(model, images.clone(), context)
    if not isinstance(trained, torch.Tensor) or trained.shape != images.shape:
        shape = tuple(trained.shape) if isinstance(trained, torch.Tensor) else type(trained)
        raise ValueError(f"it returned a batch of {shape}, expected {tuple(images.shape)}")
    if trained.dtype != images.dtype:
        raise ValueError(f"it returned a {trained.dtype} batch, expected {images.dtype}")
    return {
        "images": trained.detach().cpu().clone(),
        "state": json_data(state, "what it returned for the server"),
        "report": json_data(copy.deepcopy(context.report), "its report"),
    }


def _server_model(message: Mapping[str, Any]) -> dict[str, Any]:
    cls = attack_class(message["target"])
    context = ServerContext(**message["context"], budget=Budget(**message["budget"]))
    sent = cls(**message["hparams"]).server_model(copy.deepcopy(message["victim"]), context)
    if not isinstance(sent, Mapping) or set(sent) != {"name", "options", "state"}:
        raise ValueError("it must return a dict with exactly the keys name, options and state")
    state = sent["state"]
    if not isinstance(sent["name"], str) or not isinstance(state, Mapping):
        raise ValueError("its name must be a string and its state a mapping")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError("its state must map parameter and buffer names to tensors")
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all())
    if bad:
        raise ValueError(f"its state holds NaN or inf (in {', '.join(bad)})")
    return {
        "name": sent["name"],
        "options": json_data(sent["options"], "its options"),
        "state": {k: v.detach().cpu().clone() for k, v in state.items()},
    }


def _reconstruct(message: Mapping[str, Any]) -> tuple[dict[str, Any], BudgetMeter]:
    cls = attack_class(message["target"])
    observation = observation_from_payload(message["payload"])
    try:
        return {
            "result": reconstruction_to_plain(cls(**message["hparams"]).reconstruct(observation))
        }, observation.budget
    except Exception as exc:  # a failing attack fails its trial, never the run
        return {"error": describe_exception(exc)}, observation.budget


def run_job(message: Mapping[str, Any]) -> dict[str, Any]:
    """Run one job; its answer (``result``) or its error, with what it used, as plain data."""
    for path in message.get("sys_path", ()):
        if path not in sys.path:
            sys.path.append(path)
    torch.set_num_threads(int(message.get("threads", 1)))
    kind = message["kind"]
    if kind == "reconstruct":
        try:
            reply, meter = _reconstruct(message)
        except Exception as exc:  # the attack's module or the payload could not be loaded
            hint = "attack classes must be importable by module and name in a fresh process"
            return {"error": f"worker setup failed ({hint}): {describe_exception(exc)}"}
        return {**reply, "usage": meter.usage(), "memory": peak_memory()}
    jobs = {"describe": _describe, "client_hook": _client_hook, "server_model": _server_model}
    if kind not in jobs:
        return {"error": f"unknown job kind {kind!r}; valid: {', '.join(JOB_KINDS)}"}
    try:
        return {"result": jobs[kind](message)}
    except Exception as exc:
        return {"error": describe_exception(exc)}
