"""``leakbench timing attacks``: the optimisation attacks' time per step and per trial on fixed
victims and gradients, so that every change to them can be compared.

Each setting is an attack, a victim of the zoo at its seeded initialisation and the FedSGD
gradient of fixed lfw-subset images (the first ``batch_size`` of the test split, or of the train
split where the setting says so), the attack told the batch size (and the labels, for Inverting
Gradients; the batch's BatchNorm statistics, for GradInversion). GradInversion is timed on its
track's victim, ResNet-18 in train mode, at the track's batch sizes 8 to 48 (train split: the test
split holds 40 images), with a group of one, so that a step is one gradient evaluation of one
member (a group of G costs G times as much). Per setting:

1. time per step: the attack run for ``2`` and for ``2 + steps`` steps (``iterations``; one
   L-BFGS step of DLG evaluates its objective up to ``max_iter`` times), the difference over
   ``steps``, in wall time and in the process's CPU time (which a loaded machine inflates far
   less than wall time); for Inverting Gradients with restarts, per restart and step;
2. time per trial: ``trials`` runs at the attack's default iterations, wall and CPU time, with
   the PSNR of the reconstruction against the images (scored by :mod:`leakbench.metrics`; the
   timing tool holds the images as the evaluator does, the attack never sees them).

Every line carries the machine's load; the figures are single-threaded unless ``threads``
says otherwise.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from leakbench.client import build_victim, fedsgd_update
from leakbench.metrics import score_trial
from leakbench.registry import ATTACKS, DATAMODULES
from leakbench.threat_model import Budget, Capability, make_observation
from leakbench.timing import load_text

WARMUP_STEPS = 2
DEFAULT_ATTACKS = ("dlg", "idlg", "inverting-gradients")
GRADINVERSION_BATCH_SIZES = (8, 16, 32, 48)  # lfw-subset-resnet18-gradinversion's


@dataclass(frozen=True)
class Setting:
    """One timed configuration: an attack with options on a victim and a batch size."""

    attack: str
    model: str
    batch_size: int = 1
    options: dict[str, Any] = field(default_factory=dict)
    eval_mode: bool = False  # BatchNorm victims are attacked at B = 1 in eval mode
    split: str = "test"

    @property
    def label(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.options.items())
        return f"{self.attack} {self.model} B={self.batch_size}{extra}"


def settings(attacks: Sequence[str], restarts: int) -> list[Setting]:
    """The timed settings of ``attacks`` (the victims of the shipped tracks)."""
    table = {
        "dlg": [Setting("dlg", "lenet-zhu"), Setting("dlg", "cnn6")],
        "idlg": [Setting("idlg", "lenet-zhu")],
        "inverting-gradients": [
            Setting("inverting-gradients", "lenet-zhu"),
            Setting("inverting-gradients", "lenet-zhu", options={"restarts": restarts}),
            Setting(
                "inverting-gradients",
                "lenet-zhu",
                options={"restarts": restarts, "batch_restarts": False},
            ),
            Setting("inverting-gradients", "resnet18", eval_mode=True),
        ],
        "gradinversion": [
            Setting("gradinversion", "resnet18", b, options={"group": 1}, split="train")
            for b in GRADINVERSION_BATCH_SIZES
        ],
    }
    unknown = sorted(set(attacks) - set(table))
    if unknown:
        raise ValueError(
            f"attacks: got {', '.join(unknown)}, expected some of {', '.join(sorted(table))}"
        )
    return [
        s for name in attacks for s in table[name] if restarts > 1 or "restarts" not in s.options
    ]


@dataclass
class Case:
    """A setting's victim, private images and the observation factory."""

    setting: Setting
    model: torch.nn.Module
    images: torch.Tensor
    labels: torch.Tensor
    update: dict[str, torch.Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def observe(self) -> Any:
        granted = {Capability.BATCH_SIZE}
        if self.setting.attack == "inverting-gradients":
            granted.add(Capability.LABELS)
        if self.setting.attack == "gradinversion":
            granted.add(Capability.BATCHNORM_STATISTICS)
        return make_observation(
            self.model,
            self.update,
            granted=frozenset(granted),
            labels=self.labels,
            input_shape=tuple(self.images.shape[1:]),
            num_classes=2,
            mean=self.mean,
            std=self.std,
            budget=Budget(),
            seed=0,
            images=self.images if Capability.BATCHNORM_STATISTICS in granted else None,
        )


def build_case(setting: Setting) -> Case:
    datamodule = DATAMODULES.get("lfw-subset")(batch_size=1, split=setting.split)
    samples = datamodule.samples(setting.split)
    items = [samples[i] for i in range(setting.batch_size)]
    images = torch.stack([x for x, _, _ in items])
    labels = torch.tensor([y for _, y, _ in items])
    shape = tuple(datamodule.input_shape)
    model = build_victim(setting.model, shape, datamodule.num_classes, seed=0)
    model.eval() if setting.eval_mode else model.train()
    update = fedsgd_update(model, images, labels)
    return Case(setting, model, images, labels, update, datamodule.mean, datamodule.std)


def run(case: Case, iterations: int | None) -> tuple[float, float, Any]:
    """One reconstruction: wall seconds, CPU seconds, the reconstruction."""
    options = dict(case.setting.options)
    if iterations is not None:
        options["iterations"] = iterations
    attack = ATTACKS.get(case.setting.attack)(**options)
    observation = case.observe()
    wall, cpu = time.perf_counter(), time.process_time()
    reconstruction = attack.reconstruct(observation)
    return time.perf_counter() - wall, time.process_time() - cpu, reconstruction


def psnr(case: Case, reconstruction: Any) -> float:
    scores = score_trial(
        truth_images=case.images,
        truth_labels=case.labels,
        sample_ids=[str(i) for i in range(len(case.images))],
        mean=case.mean,
        std=case.std,
        reconstructed_images=reconstruction.images,
    )
    values = sorted(s["psnr"] for s in scores["samples"])
    return values[len(values) // 2]


def time_setting(setting: Setting, steps: int, trials: int) -> dict[str, Any]:
    case = build_case(setting)
    per = max(1, int(setting.options.get("restarts", 1)))
    short = run(case, WARMUP_STEPS)
    long = run(case, WARMUP_STEPS + steps)
    result: dict[str, Any] = {
        "setting": setting.label,
        "step_wall_ms": (long[0] - short[0]) / steps / per * 1e3,
        "step_cpu_ms": (long[1] - short[1]) / steps / per * 1e3,
        "evaluations_per_step": None,
        "trials": [],
        "load": load_text(),
    }
    evaluations = long[2].info.get("evaluations")
    if evaluations is not None:
        result["evaluations_per_step"] = evaluations / (WARMUP_STEPS + steps)
    for _ in range(trials):
        wall, cpu, reconstruction = run(case, None)
        result["trials"].append(
            {"wall_s": wall, "cpu_s": cpu, "psnr_median": psnr(case, reconstruction)}
        )
    return result


def timing_attacks(
    *,
    attacks: Sequence[str] | None,
    steps: int,
    trials: int,
    restarts: int,
    threads: int | None,
    output: Path | None,
    echo: Any = print,
) -> int:
    """Time every setting of ``attacks`` and print one line each (see the module docstring)."""
    if steps < 1 or trials < 0 or restarts < 1:
        raise ValueError(
            f"steps, trials, restarts: got {steps}, {trials}, {restarts}; expected at least 1, "
            "0 and 1"
        )
    chosen = settings(list(attacks or DEFAULT_ATTACKS), restarts)
    torch.set_num_threads(threads or 1)
    echo(f"{torch.get_num_threads()} thread(s); before: {load_text()}")
    results = []
    for setting in chosen:
        result = time_setting(setting, steps, trials)
        results.append(result)
        line = (
            f"{result['setting']:<66} per step {result['step_wall_ms']:8.2f} ms wall, "
            f"{result['step_cpu_ms']:8.2f} ms CPU"
        )
        if result["evaluations_per_step"] is not None:
            line += f" ({result['evaluations_per_step']:.1f} evaluations)"
        for trial in result["trials"]:
            line += (
                f"; trial {trial['wall_s']:.1f} s wall, {trial['cpu_s']:.1f} s CPU, "
                f"PSNR {trial['psnr_median']:.1f} dB"
            )
        echo(f"{line}; {result['load']}")
    echo(f"after: {load_text()}")
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "settings": [asdict(s) for s in chosen],
            "threads": torch.get_num_threads(),
            "steps": steps,
            "results": results,
        }
        output.write_text(json.dumps(payload, indent=2) + "\n")
        echo(f"wrote {output}")
    return 0
