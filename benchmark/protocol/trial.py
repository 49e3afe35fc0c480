"""One trial, end to end, as plain code: the only place that holds the private batch.

Lightning's evaluator, the studies (``leakbench boundary``, ...) and verification all call
:func:`run_trial`; none of them has a second copy of these steps:

0. (verification only) the private samples are changed by a secret, seeded transform;
1. the client builds a fresh victim from its specification; where the run grants the attack's
   class ``server_model``, the server first sends a model of its own making (plain data: a zoo
   name, options and a state, built here from the zoo) and the client trains that instead;
2. the attack's client code runs, only where the run granted it to the attack's class;
3. the client protocol runs the round under the defense (``defense.apply``): FedSGD's gradient
   of the mean cross-entropy, FedAvg's weight delta after local SGD steps, or the sum of K
   clients' updates, each client holding its own slice of the trial's batch
   (:mod:`leakbench.client`); the defense reports what it did (``defense_report``);
4. the server's Observation is assembled as plain data: the specification and state of the
   model the client trained, the shared update, the granted metadata (the client protocol's
   local hyperparameters, the batch's BatchNorm statistics among them), the budget and an
   attacker seed that does not identify the trial;
5. the attack reconstructs, isolated in a worker process by default
   (:mod:`leakbench.protocol.isolation`);
6. scoring through the canonical metrics module, against the private batch (every client's
   samples: any of them is the server's target): pixels, and where the setting holds a gallery
   and a reference classifier, identifiability and task leakage; when the client trained on a
   changed batch, against that batch too, with what the change cost each image;
7. covariates (analyses of the model and the batch the client trained on) and the record.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from leakbench.client import ClientProtocol, FedSGD
from leakbench.interfaces import Defense
from leakbench.metrics import perturbation, score_trial, to_pixels
from leakbench.protocol.attack import PreparedAttack
from leakbench.protocol.isolation import (
    AttackOutcome,
    Placement,
    default_threads,
    observation_payload,
    peak_memory,
    reconstruct,
    run_attack_job,
)
from leakbench.protocol.jobs import json_data
from leakbench.protocol.private_transform import PrivateTransform
from leakbench.protocol.records import attack_seed, trial_seed
from leakbench.protocol.sandbox import SandboxView
from leakbench.protocol.victim import Victim
from leakbench.registry import COVARIATES
from leakbench.threat_model import Budget, Capability, batchnorm_statistics, protocol_view


@dataclass(frozen=True)
class TrialSetting:
    """What is fixed for every trial of one cell."""

    cell: str
    attack_name: str
    defense_name: str
    batch_size: int
    input_shape: tuple[int, ...]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    granted: frozenset[Capability]
    budget: Budget
    dtype: torch.dtype
    client_mode: str
    seed: int
    success_psnr: float
    covariates: tuple[str, ...] = ()
    with_lpips: bool = False
    # Where attack code runs (leakbench.protocol.isolation): "sandbox" (with its view of the
    # file system), "process", or "in-process" (debugging, overhead measurements).
    isolation: str = "process"
    sandbox_view: SandboxView | None = field(default=None, compare=False)
    # Verification only: a secret change of every sample before the client sees it.
    private_transform: PrivateTransform | None = None
    threads: int | None = None  # the attack worker's intra-op threads; None: all cores
    # Capability.SURROGATE_DATA: samples of the dataset's other split (model inputs, labels),
    # for the attack's server code. Left out of comparisons: they hold tensors.
    surrogate: tuple[Tensor, Tensor] | None = field(default=None, compare=False)
    # How the shared update comes about. ``batch_size`` is one client's; a trial's batch holds
    # ``client_protocol.samples_per_trial(batch_size)`` samples (K·B for an aggregate of K).
    client_protocol: ClientProtocol = FedSGD()
    # Privacy metrics beyond pixels (leakbench.metrics): the split's images in [0, 1] with their
    # ids, the gallery a reconstruction must be identified in, and the dataset's reference
    # classifier, rebuilt for every trial like the victim (nothing an attack does to a model
    # object reaches the scoring of another trial). Left out of comparisons: they hold tensors.
    gallery: Tensor | None = field(default=None, compare=False)
    gallery_ids: tuple[str, ...] | None = None
    classifier: Victim | None = field(default=None, compare=False)


@dataclass
class TrialOutcome:
    """The trial's JSON record and (ground truth, matched reconstruction) pixel pairs."""

    record: dict[str, Any]
    pairs: list[tuple[Tensor, Tensor]]


def private_images(
    images: Tensor,
    trial: int,
    dtype: torch.dtype,
    transform: PrivateTransform | None,
    mean: Sequence[float],
    std: Sequence[float],
) -> Tensor:
    """The private batch as the client holds it: the drawn ``images`` of ``trial`` in the run's
    ``dtype``, changed by the private transform where verification sets one. Scoring takes them
    as the ground truth, and so does the null baseline of a defense's verification."""
    private = images.to(dtype)
    return private if transform is None else transform(private, trial, mean, std)


def run_trial(
    victim: Victim,
    attack: PreparedAttack,
    defense: Defense,
    setting: TrialSetting,
    batch: dict[str, Any],
) -> TrialOutcome:
    """Run one trial on ``batch`` (a ``TrialDataset`` item) and return its record."""
    started = time.perf_counter()
    s = setting
    _check_protocol(attack, s)
    trial = int(batch["trial"])
    seed = trial_seed(s.seed, trial)
    attacker_seed = attack_seed(s.seed, s.cell)
    transform = None if batch.get("error") else s.private_transform
    private = private_images(batch["images"], trial, s.dtype, transform, s.mean, s.std)
    labels = batch["labels"]
    generator = torch.Generator().manual_seed(seed)
    record: dict[str, Any] = {
        "cell": s.cell,
        "attack": s.attack_name,
        "defense": s.defense_name,
        "batch_size": s.batch_size,
        "trial": trial,
        "seed": seed,
        "attack_seed": attacker_seed,
        "isolation": s.isolation,
        "sample_ids": list(batch["sample_ids"]),
        "client": int(batch.get("client", 0)),
        "labels": labels.tolist(),
        "client_protocol": s.client_protocol.spec(),
    }
    if batch.get("error"):  # a sample could not be read: nothing to attack
        return _failed(record, setting, private, labels, batch["sample_ids"], batch["error"])

    # 1-3. The client: a fresh victim (the server's own model where granted), the attack's
    # client code where granted, the defense.
    if Capability.SERVER_MODEL in attack.requires and Capability.SERVER_MODEL in s.granted:
        try:
            victim = server_model(attack, victim, s, attacker_seed)
        except Exception as exc:
            return _failed(
                record, setting, private, labels, batch["sample_ids"], f"server model: {exc}"
            )
        record["server_model"] = {"name": victim.name, "options": dict(victim.options)}
    model = victim.build().to(private.device).train(s.client_mode == "train")
    trained_images, client_state, client_seconds, client_report = private, None, None, None
    if attack.runs_client_code and Capability.CLIENT_CODE in s.granted:
        hook_started = time.perf_counter()
        try:
            trained_images, client_state, client_report = _client_code(
                attack, victim, private, attacker_seed, s
            )
            client_seconds = time.perf_counter() - hook_started
        except ValueError as exc:
            return _failed(
                record, setting, private, labels, batch["sample_ids"], f"client code: {exc}"
            )
    share = s.client_protocol.share(model, trained_images, labels, defense, generator)

    # 4-5. The server: the Observation as plain data, the attack in its worker.
    payload = observation_payload(
        victim=victim,
        client_mode=s.client_mode,
        update=share.update,
        input_shape=s.input_shape,
        num_classes=s.num_classes,
        mean=s.mean,
        std=s.std,
        budget=s.budget,
        seed=attacker_seed,
        batch_size=int(labels.shape[0]) if Capability.BATCH_SIZE in s.granted else None,
        labels=share.labels if Capability.LABELS in s.granted else None,
        client_state=client_state,
        device=str(private.device),
        client_protocol=protocol_view(s.client_protocol.spec(), s.granted),
        batchnorm_statistics=(
            batchnorm_statistics(model, share.images)
            if Capability.BATCHNORM_STATISTICS in s.granted
            else None
        ),
    )
    outcome = _attack(attack, payload, setting)

    # 6. Scoring against the private batch (and against what the client trained on).
    answer = outcome.reconstruction
    scores = _score(setting, private, labels, batch["sample_ids"], answer)
    matched = scores.pop("matched_pixels")
    record.update(
        status="ok" if answer is not None else ("timeout" if outcome.timed_out else "failed"),
        error=outcome.error,
        time_s=outcome.usage.get("seconds"),
        budget={"limits": s.budget.to_dict(), "used": outcome.usage},
        inferred_batch_size=answer.batch_size if answer is not None else None,
        inferred_labels=(
            answer.labels.tolist() if answer is not None and answer.labels is not None else None
        ),
        attack_info=answer.info if answer is not None else {},
        client_state=client_state,
        client_code_s=client_seconds,  # the attack's client code, on the client
        client_report=client_report,  # its diagnostics: recorded, not sent to the server
        defense_report=json_data(share.info, "the defense's report"),  # what it did this round
        metrics=scores,
    )
    if not torch.equal(share.images, private):
        trained = _score(
            setting, share.images, share.labels, batch["sample_ids"], answer, privacy=False
        )
        trained.pop("matched_pixels")
        record["metrics_vs_trained"] = trained
        record["perturbation"] = perturbation(private, share.images.detach(), s.mean, s.std)

    # 7. Covariates of what produced the update: the client's model and trained batch.
    record["covariates"] = _covariates(s.covariates, model, share.images.detach(), share.labels)
    record["wall_s"] = time.perf_counter() - started  # the whole trial, as the harness saw it
    # Peak memory: the attack's worker (in-process: the harness, over its lifetime so far).
    record["memory"] = {
        **(outcome.memory or {}),
        "harness_peak_rss_mb": peak_memory()["peak_rss_mb"],
    }
    truth = to_pixels(private, s.mean, s.std)
    return TrialOutcome(record, list(zip(truth, matched, strict=True)))


def server_model(attack: PreparedAttack, victim: Victim, s: TrialSetting, seed: int) -> Victim:
    """The model the server sends instead of ``victim``. The attack's ``server_model`` runs as
    a job where its code runs (in a sandbox of its own under ``sandbox``), on plain data: the
    victim's name, options and state, the run's public facts and the surrogate data where
    granted; it answers a zoo name, JSON options and a state of tensors, and the model is
    built here, from the zoo, for the run's input shape and class count, its state loaded
    strictly."""
    surrogate = s.surrogate if Capability.SURROGATE_DATA in s.granted else None
    message = {
        "kind": "server_model",
        "target": dict(attack.target),
        "hparams": attack.hparams,
        "victim": {
            "name": victim.name,
            "options": json_data(dict(victim.options), "the victim's options"),
            "input_shape": list(victim.input_shape),
            "num_classes": victim.num_classes,
            "state": {k: v.detach().cpu().clone() for k, v in victim.build().state_dict().items()},
        },
        "context": {
            "input_shape": list(s.input_shape),
            "num_classes": s.num_classes,
            "mean": list(s.mean),
            "std": list(s.std),
            "seed": seed,
            "surrogate_images": None if surrogate is None else surrogate[0].detach().cpu().clone(),
            "surrogate_labels": None if surrogate is None else surrogate[1].detach().cpu().clone(),
        },
        "budget": s.budget.to_dict(),
    }
    reply = run_attack_job(attack.name, message, _placement(s), s.budget.max_seconds, fresh=True)
    if "error" in reply:
        raise ValueError(str(reply["error"]))
    sent = reply["result"]
    name, options, state = sent["name"], sent["options"], sent["state"]
    if not isinstance(name, str) or not isinstance(options, dict) or not isinstance(state, dict):
        raise ValueError("it answered something other than a name, options and a state")
    state = {
        k: v.to(victim.dtype).clone() if v.is_floating_point() else v.clone()
        for k, v in state.items()
    }
    sent_victim = Victim(
        name, victim.input_shape, victim.num_classes, options, victim.seed, victim.dtype, state
    )
    # The zoo refuses an unregistered name or bad options, and a state that does not fit.
    sent_victim.build()
    return sent_victim


def _check_protocol(attack: PreparedAttack, s: TrialSetting) -> None:
    """The attack was prepared for this trial's client protocol (refused before any trial by
    ``prepare_attack``; here for a harness that prepared it for another one)."""
    if attack.client_protocol != s.client_protocol:
        raise ValueError(
            f"attack {attack.name!r} was prepared for the client protocol "
            f"{attack.client_protocol.spec()}, but the trial runs {s.client_protocol.spec()}"
        )


def _placement(s: TrialSetting) -> Placement:
    return Placement(s.isolation, s.threads or default_threads(), s.sandbox_view)


def _client_code(
    attack: PreparedAttack, victim: Victim, private: Tensor, seed: int, s: TrialSetting
) -> tuple[Tensor, Any, Any]:
    """The attack's client code on the client's model and batch (in a sandbox of its own under
    ``sandbox``): the batch the client trains on, the state for the server and its report."""
    message = {
        "kind": "client_hook",
        "target": dict(attack.target),
        "hparams": attack.hparams,
        "victim": victim.spec(),
        "client_mode": s.client_mode,
        "images": private.detach().cpu().clone(),
        "context": {
            "input_shape": list(s.input_shape),
            "num_classes": s.num_classes,
            "mean": list(s.mean),
            "std": list(s.std),
            "seed": seed,
        },
        "budget": s.budget.to_dict(),
    }
    reply = run_attack_job(attack.name, message, _placement(s), s.budget.max_seconds, fresh=True)
    if "error" in reply:
        raise ValueError(str(reply["error"]))
    result = reply["result"]
    images = result["images"]
    if not isinstance(images, Tensor) or images.shape != private.shape:
        raise ValueError(f"it returned {type(images).__name__}, expected a batch like the client's")
    return images.to(private.device, private.dtype), result["state"], result["report"]


def _attack(attack: PreparedAttack, payload: dict[str, Any], s: TrialSetting) -> AttackOutcome:
    bad = [n for n, g in payload["update"].items() if not torch.isfinite(g).all()]
    if bad:
        message = f"the shared update contains NaN or inf (in {', '.join(bad)})"
        return AttackOutcome(None, message, False, {"iterations": 0, "seconds": 0.0})
    outcome = reconstruct(
        attack.name,
        dict(attack.target),
        attack.hparams,
        payload,
        _placement(s),
        s.budget.max_seconds,
    )
    answer = outcome.reconstruction
    if answer is None:
        return outcome
    images = answer.images
    if images.dim() != 4 or tuple(images.shape[1:]) != tuple(s.input_shape):
        message = f"reconstruction has shape {tuple(images.shape)}, expected (N, *{s.input_shape})"
        return AttackOutcome(None, message, False, outcome.usage, outcome.memory)
    if not torch.isfinite(images).all():
        message = "reconstruction contains NaN or inf"
        return AttackOutcome(None, message, False, outcome.usage, outcome.memory)
    return outcome


def _score(
    s: TrialSetting,
    truth: Tensor,
    labels: Tensor,
    sample_ids: Sequence[str],
    answer: Any,
    privacy: bool = True,
) -> dict[str, Any]:
    """Canonical scores; ``privacy``: with identifiability and task leakage where the setting
    has a gallery and a classifier (not for the batch the client trained on: it would repeat
    the identification by sample id and spend the classifier again)."""
    return score_trial(
        truth_images=truth.detach(),
        truth_labels=labels,
        sample_ids=sample_ids,
        mean=s.mean,
        std=s.std,
        reconstructed_images=answer.images if answer is not None else None,
        reconstructed_labels=answer.labels if answer is not None else None,
        inferred_batch_size=answer.batch_size if answer is not None else None,
        success_psnr=s.success_psnr,
        with_lpips=s.with_lpips,
        gallery=s.gallery if privacy else None,
        gallery_ids=s.gallery_ids if privacy else None,
        classifier=s.classifier.build().eval() if privacy and s.classifier else None,
    )


def _failed(
    record: dict[str, Any],
    s: TrialSetting,
    images: Tensor,
    labels: Tensor,
    sample_ids: Sequence[str],
    error: str,
) -> TrialOutcome:
    """A trial that failed before the attack ran: scored as failed, with its reason (not for
    identifiability or task leakage: an unreadable sample has no ground truth to look up)."""
    scores = _score(s, images, labels, sample_ids, None, privacy=False)
    matched = scores.pop("matched_pixels")
    record.update(
        status="failed",
        error=error,
        time_s=0.0,
        budget={"limits": s.budget.to_dict(), "used": {"iterations": 0, "seconds": 0.0}},
        inferred_batch_size=None,
        inferred_labels=None,
        attack_info={},
        client_state=None,
        client_code_s=None,
        client_report=None,
        defense_report=None,
        metrics=scores,
        covariates={},
        wall_s=0.0,
    )
    truth = to_pixels(images, s.mean, s.std)
    return TrialOutcome(record, list(zip(truth, matched, strict=True)))


def _covariates(
    names: Sequence[str], model: nn.Module, images: Tensor, labels: Tensor
) -> dict[str, Any]:
    covariates: dict[str, Any] = {}
    for name in names:
        try:
            value = COVARIATES.get(name)(copy.deepcopy(model), images, labels)
        except Exception as exc:  # a covariate must never cost the trial
            value = {"error": f"{type(exc).__name__}: {exc}"}
        if value is not None:
            covariates[name] = value
    return covariates
