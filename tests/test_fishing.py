"""The fishing attack: the client-side LP makes every sample exclusive, ExAN told the
assignment recovers the perturbed batch exactly; budgets, solvers, failures, what travels."""

import functools
import itertools
import json
import subprocess
import sys

import pytest
import torch

from leakbench.analysis.exclusivity import analyse_exclusivity
from leakbench.attacks._fishing_lp import assign_min_cost
from leakbench.attacks.fishing import Fishing
from leakbench.cli import main
from leakbench.client import build_victim, fedsgd_update
from leakbench.config import RunConfig
from leakbench.interfaces import Defense, UnsupportedModelError
from leakbench.metrics import match
from leakbench.protocol import TrialSetting, Victim, prepare_attack, run_trial
from leakbench.registry import ATTACKS, DATAMODULES
from leakbench.runner import run
from leakbench.threat_model import (
    Budget,
    Capability,
    ClientContext,
    RequirementsNotGranted,
    make_observation,
)

SHAPE = (1, 10, 10)
MEAN, STD = (0.5,), (0.25,)
CLASSES = 4
BATCH = 8
LP_KEYS = {
    "solver",
    "solver_version",
    "objective",
    "assignment",
    "status",
    "value",
    "seconds",
    "cpu_seconds",
    "rows",
    "unprotected",
    "workers",
    "wall_seconds",
    "time_limit",
    "client_seconds",
}


def victim(widths=(128,)):
    return build_victim("fcn", SHAPE, CLASSES, seed=0, dtype=torch.float64, widths=widths)


def private_batch(seed=0, batch=BATCH):
    """Uniform pixels in [0, 1], normalised with MEAN/STD, and random labels."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(batch, *SHAPE, generator=g, dtype=torch.float64)
    return (pixels - MEAN[0]) / STD[0], torch.randint(CLASSES, (batch,), generator=g)


@functools.cache
def fished(widths=(128,), seed=0, **options):
    """(model, private images, labels, perturbed images, client state, client report)."""
    model = victim(widths)
    images, labels = private_batch(seed)
    context = ClientContext(SHAPE, CLASSES, MEAN, STD, Budget(), seed=3)
    perturbed, state = Fishing(**options).client_hook(model, images.clone(), context)
    return model, images, labels, perturbed, state, context.report


def observe(model, images, labels, state):
    return make_observation(
        model,
        fedsgd_update(model, images, labels),
        granted=frozenset({Capability.CLIENT_CODE}),
        labels=labels,
        input_shape=SHAPE,
        num_classes=CLASSES,
        mean=MEAN,
        std=STD,
        budget=Budget(),
        seed=0,
        client_state=state,
    )


def linf(perturbed, images):
    """Per-sample L∞ of the perturbation in pixel units."""
    return ((perturbed - images) * STD[0]).flatten(1).abs().max(dim=1).values


def test_registered_and_requires_client_code():
    assert ATTACKS.get("fishing") is Fishing
    assert Fishing.requires == frozenset({Capability.CLIENT_CODE})


def test_not_every_sample_is_exclusive_before_the_hook():
    # Otherwise the tests below would not show what the LP does.
    model, images, *_ = fished()
    assert not analyse_exclusivity(model, images).holds


def test_after_the_hook_every_sample_owns_its_k_units_as_exans():
    model, images, _, perturbed, state, report = fished()
    assert report["lp"]["status"] == ["optimal"] * BATCH
    exclusivity = analyse_exclusivity(model, perturbed)
    assert exclusivity.holds and int(exclusivity.counts.min()) >= 2
    active = model[1](perturbed.flatten(1)) > 0
    for m, units in enumerate(state["assignment"][0]):
        assert len(units) == 2
        assert bool(active[m, units].all()) and int(active[:, units].sum()) == 2
    pixels = perturbed * STD[0] + MEAN[0]
    assert float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0
    # The LP's objective is the perturbation's L∞, and the perturbation is small.
    torch.testing.assert_close(
        linf(perturbed, images), torch.tensor(report["lp"]["value"], dtype=torch.float64)
    )
    assert float(linf(perturbed, images).max()) < 0.1


def test_the_perturbed_batch_is_recovered_exactly_with_batch_size_and_labels():
    model, _, labels, perturbed, state, report = fished()
    reconstruction = Fishing().reconstruct(observe(model, perturbed, labels, state))
    assert reconstruction.batch_size == BATCH
    assert reconstruction.info["groups_assigned"] == BATCH
    pairs = match(reconstruction.images, perturbed)  # {truth: reconstruction}
    assert sorted(pairs) == list(range(BATCH))
    for truth, recon in pairs.items():
        assert float(((reconstruction.images[recon] - perturbed[truth]) ** 2).mean()) < 1e-20
        assert int(reconstruction.labels[recon]) == int(labels[truth])
    assert reconstruction.info["gradient_residual"] < 1e-12


@pytest.mark.parametrize("objective", ["linf", "l1"])
def test_tau_max_bounds_every_perturbation(objective):
    free = fished(objective=objective)[5]["lp"]["value"]
    model, images, _, perturbed, state, report = fished(objective=objective, tau_max=0.02)
    statuses = report["lp"]["status"]
    assert "optimal" in statuses
    assert set(statuses) <= {"optimal", "infeasible"}
    assert float(linf(perturbed, images).max()) <= 0.02 + 1e-12
    if objective == "linf":  # exactly the samples whose free optimum exceeds the budget fail
        assert statuses == ["infeasible" if v > 0.02 else "optimal" for v in free]
    else:  # the budget binds: L1 solutions move few pixels far
        assert max(linf(fished(objective="l1")[3], images)) > 0.02
    for m, status in enumerate(statuses):
        if status == "infeasible":
            assert torch.equal(perturbed[m], images[m])


def test_an_impossible_budget_gives_infeasible_samples_not_a_crash():
    model, images, labels, perturbed, state, report = fished(tau_max=1e-6)
    assert report["lp"]["status"] == ["infeasible"] * BATCH
    assert report["lp"]["value"] == [None] * BATCH
    assert torch.equal(perturbed, images)  # every sample stays unperturbed


def test_cbc_and_highs_agree_on_feasibility_and_objective():
    for options in ({}, {"objective": "l1"}, {"tau_max": 0.02}):
        cbc = fished(solver="cbc", **options)[5]["lp"]
        highs = fished(solver="highs", **options)[5]["lp"]
        assert (cbc["solver"], highs["solver"]) == ("cbc", "highs")
        assert cbc["status"] == highs["status"]
        for a, b in zip(cbc["value"], highs["value"], strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert a == pytest.approx(b, rel=1e-6, abs=1e-9)


def test_highs_is_given_only_the_rows_that_bind_and_finds_the_full_optimum():
    lp = fished()[5]["lp"]
    given = [g for g, _ in lp["rows"]]
    total = [t for _, t in lp["rows"]]
    # The homogeneous L∞ LP has one row per constrained unit and two per pixel (the box).
    assert all(t == 2 * (BATCH - 1) + 2 + 2 * 100 for t in total)
    assert all(0 < g < t for g, t in zip(given, total, strict=True))
    assert sum(given) < 0.5 * sum(total)
    # CBC is given every row: the same optima (see the agreement test) from the full LP.
    cbc = fished(solver="cbc")[5]["lp"]
    assert [g for g, _ in cbc["rows"]] == total


def test_the_lps_run_in_parallel_with_the_same_answers():
    one = fished(workers=1)
    two = fished(workers=2)
    assert torch.equal(one[3], two[3])
    assert one[5]["lp"]["value"] == two[5]["lp"]["value"]
    assert (one[5]["lp"]["workers"], two[5]["lp"]["workers"]) == (1, 2)


def test_the_min_cost_assignment_is_the_cheapest_of_all():
    g = torch.Generator().manual_seed(5)
    pre = torch.randn(3, 7, generator=g, dtype=torch.float64).numpy()
    jacobian = torch.randn(7, 4, generator=g, dtype=torch.float64).numpy()
    epsilon, k = 0.1, 2
    squared = (jacobian**2).sum(axis=1)

    def cost(assignment):
        owned = {u: m for m, units in enumerate(assignment) for u in units}
        return sum(
            (max(epsilon - pre[m, u], 0) ** 2 if m == owner else max(pre[m, u] + epsilon, 0) ** 2)
            / squared[u]
            for u, owner in owned.items()
            for m in range(3)
        )

    best = min(
        cost([units[0:2], units[2:4], units[4:6]]) for units in itertools.permutations(range(7), 6)
    )
    chosen = assign_min_cost(pre, jacobian, k, epsilon)
    assert all(len(units) == k for units in chosen)
    assert len({u for units in chosen for u in units}) == 3 * k
    assert cost(chosen) == pytest.approx(best, rel=1e-12)
    # More samples than units allow: those left without k units are unassigned.
    assert sum(not units for units in assign_min_cost(pre[:, :5], jacobian[:5], k, epsilon)) == 1


def test_highs_prints_nothing_on_the_clients_output():
    # HiGHS prints a banner when a process makes its first solver: a fresh process shows it.
    script = (
        "import torch\n"
        "from leakbench.attacks.fishing import Fishing\n"
        "from leakbench.client import build_victim\n"
        "from leakbench.threat_model import Budget, ClientContext\n"
        "model = build_victim('fcn', (1, 4, 4), 2, seed=0, dtype=torch.float64, widths=(32,))\n"
        "images = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0),"
        " dtype=torch.float64)\n"
        "context = ClientContext((1, 4, 4), 2, (0.0,), (1.0,), Budget(), seed=0)\n"
        "Fishing().client_hook(model, images, context)\n"
        "print(context.report['lp']['status'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    )
    assert done.stdout.strip() == "['optimal', 'optimal']"


@pytest.mark.slow
def test_fishing_is_exact_at_64_on_the_tracks_victim():
    """The fishing track's victim and data at B = 64: every sample's LP solved, the perturbed
    batch recovered exactly (float64), with its batch size and labels."""
    datamodule = DATAMODULES.get("lfw-subset")(batch_size=64, num_trials=1, seed=0, split="train")
    (trial,) = list(datamodule.trials())
    images, labels = trial["images"].to(torch.float64), torch.as_tensor(trial["labels"])
    shape = tuple(datamodule.input_shape)
    model = build_victim("fcn-exan", shape, datamodule.num_classes, seed=0, dtype=torch.float64)
    context = ClientContext(
        shape, datamodule.num_classes, datamodule.mean, datamodule.std, Budget(), seed=0
    )
    perturbed, state = Fishing().client_hook(model, images.clone(), context)
    lp = context.report["lp"]
    assert lp["status"] == ["optimal"] * 64 and lp["unprotected"] == []
    observation = make_observation(
        model,
        fedsgd_update(model, perturbed, labels),
        granted=frozenset({Capability.CLIENT_CODE}),
        labels=None,
        input_shape=shape,
        num_classes=datamodule.num_classes,
        mean=datamodule.mean,
        std=datamodule.std,
        budget=Budget(),
        seed=0,
        client_state=state,
    )
    reconstruction = Fishing().reconstruct(observation)
    assert reconstruction.batch_size == 64
    pairs = match(reconstruction.images, perturbed)
    assert sorted(pairs) == list(range(64))
    for truth, recon in pairs.items():
        assert float((reconstruction.images[recon] - perturbed[truth]).abs().max()) < 1e-10
        assert int(reconstruction.labels[recon]) == int(labels[truth])


def test_client_state_carries_the_assignment_only():
    _, _, _, _, state, report = fished()
    assert json.loads(json.dumps(state, allow_nan=False)) == state  # plain JSON data
    assert set(state) == {"assignment"}
    (layer,) = state["assignment"]  # one ReLU layer
    assert len(layer) == BATCH
    units = [u for owned in layer for u in owned]
    assert all(isinstance(u, int) for u in units) and len(set(units)) == 2 * BATCH
    # The LPs' facts are the client's report: recorded, never sent to the server.
    assert set(report) == {"lp"} and set(report["lp"]) == LP_KEYS
    lp = report["lp"]
    assert lp["solver"] == "highs" and lp["solver_version"].startswith("HiGHS (highspy ")
    assert lp["objective"] == "linf" and lp["assignment"] == "min_cost"
    assert lp["unprotected"] == []
    for key in ("status", "value", "seconds", "cpu_seconds", "rows"):
        assert len(lp[key]) == BATCH
    # Per sample one objective and one time; three times for the batch.
    numbers = [v for v in lp["value"] + lp["seconds"] if v is not None]
    assert len(numbers) == 2 * BATCH
    assert all(isinstance(lp[k], float) for k in ("wall_seconds", "time_limit", "client_seconds"))
    assert lp["client_seconds"] >= lp["wall_seconds"] >= max(lp["seconds"])


def test_the_seeded_rule_assigns_from_public_information_only():
    a = fished(assignment="seeded")
    b = fished(assignment="seeded", seed=1)  # another private batch, same seed
    assert a[4]["assignment"] == b[4]["assignment"]
    assert analyse_exclusivity(a[0], a[3]).holds
    assert fished()[4]["assignment"] != fished(seed=1)[4]["assignment"]  # margin reads the batch


def test_all_layers_make_every_relu_layer_exclusive_and_exact():
    widths = (96, 64)
    model, _, labels, perturbed, state, report = fished(widths=widths)
    assert len(state["assignment"]) == 2
    assert report["lp"]["status"] == ["optimal"] * BATCH
    exclusivity = analyse_exclusivity(model, perturbed)
    assert exclusivity.holds and int(exclusivity.counts.min()) >= 2
    reconstruction = Fishing().reconstruct(observe(model, perturbed, labels, state))
    assert reconstruction.batch_size == BATCH
    pairs = match(reconstruction.images, perturbed)
    assert sorted(pairs) == list(range(BATCH))
    assert all(
        float(((reconstruction.images[r] - perturbed[t]) ** 2).mean()) < 1e-20
        for t, r in pairs.items()
    )
    with pytest.raises(UnsupportedModelError, match="layers='first' constrains only the first"):
        Fishing(layers="first").check_model(model)


def test_time_limits_come_from_the_budget_and_stop_the_lps():
    attack = Fishing(workers=2)
    context = ClientContext(SHAPE, CLASSES, MEAN, STD, Budget(max_seconds=10.0), seed=0)
    assert attack.lp_seconds(context, 8) == pytest.approx(0.5 * 10.0 * 2 / 8)
    assert (
        attack.lp_seconds(ClientContext(SHAPE, CLASSES, MEAN, STD, Budget(), seed=3), 8) == 60.0
    )  # no budget: a cap, so nothing hangs
    assert Fishing(time_limit=3.0).lp_seconds(context, 8) == 3.0
    # A limit far below one LP's solve time: the LPs stop, every sample is recorded.
    model, images, _, perturbed, state, report = fished(solver="highs", time_limit=1e-6)
    statuses = report["lp"]["status"]
    assert "time_limit" in statuses and set(statuses) <= {"optimal", "feasible", "time_limit"}
    for m, status in enumerate(statuses):
        if status == "time_limit":
            assert torch.equal(perturbed[m], images[m])
    # The record names every sample the limit left unprotected.
    assert report["lp"]["unprotected"] == [
        {"sample": m, "status": s} for m, s in enumerate(statuses) if s == "time_limit"
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"k": 1}, "k must be at least 2"),
        ({"objective": "l2"}, "objective must be one of linf, l1"),
        ({"solver": "gurobi"}, "solver must be one of highs, cbc"),
        ({"assignment": "random"}, "assignment must be one of min_cost, margin, seeded"),
        ({"tau_max": 0.0}, "tau_max must be positive"),
        ({"epsilon": -1.0}, "epsilon must be positive"),
    ],
)
def test_bad_hyperparameters_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        Fishing(**options)


def test_a_run_without_the_client_code_grant_refuses_fishing(tmp_path):
    message = "attack 'fishing' requires client_code, which this run does not grant"
    with pytest.raises(RequirementsNotGranted, match=message):
        prepare_attack("fishing", {}, frozenset({Capability.BATCH_SIZE}))
    config = RunConfig.from_mapping(
        {
            "dataset": "lfw-subset",
            "model": "fcn-exan",
            "attacks": ["fishing"],
            "batch_sizes": [8],
            "trials": 1,
            "grants": ["batch_size"],
            "output_dir": str(tmp_path),
            "logger": "none",
        }
    )
    with pytest.raises(RequirementsNotGranted, match=message):
        run(config, progress=False, echo=lambda _: None)
    assert not any(tmp_path.iterdir()), "nothing is written for a refused run"


def test_a_protocol_trial_scores_the_original_and_the_perturbed_batch():
    images, labels = private_batch(2)
    spec = Victim("fcn", SHAPE, CLASSES, {"widths": (128,)}, seed=0, dtype=torch.float64)
    setting = TrialSetting(
        cell="fishing__none__b8",
        attack_name="fishing",
        defense_name="none",
        batch_size=BATCH,
        input_shape=SHAPE,
        num_classes=CLASSES,
        mean=MEAN,
        std=STD,
        granted=frozenset({Capability.CLIENT_CODE}),
        budget=Budget(max_seconds=60),
        dtype=torch.float64,
        client_mode="eval",
        seed=0,
        success_psnr=30.0,
        covariates=("exclusivity",),
        isolation="in-process",
    )
    batch = {
        "trial": 0,
        "images": images,
        "labels": labels,
        "sample_ids": [f"s{i}" for i in range(BATCH)],
    }
    attack = prepare_attack("fishing", {}, frozenset({Capability.CLIENT_CODE}))
    record = run_trial(spec, attack, Defense(), setting, batch).record
    assert record["status"] == "ok", record["error"]
    assert record["client_report"]["lp"]["status"] == ["optimal"] * BATCH
    assert set(record["client_state"]) == {"assignment"}
    assert record["covariates"]["exclusivity"]["condition"]
    perturbed = [s["psnr"] for s in record["metrics_vs_trained"]["samples"]]
    original = [s["psnr"] for s in record["metrics"]["samples"]]
    assert min(perturbed) >= 250.0  # exact (PSNR is capped at 300 dB)
    cost = [s["psnr"] for s in record["perturbation"]]
    assert original == pytest.approx(cost, abs=1e-6)  # against the original: the LP's cost
    assert record["metrics_vs_trained"]["batch_size_correct"]


def test_the_study_command_prints_and_writes_the_issue_figures(tmp_path, capsys):
    code = main(
        [
            "fishing-study",
            "--batch-sizes",
            "[4]",
            "--trials",
            "2",
            "--ig-trials",
            "1",
            "--ig-options",
            "{iterations: 2}",
            "--train-epochs",
            "[0,1]",
            "--solvers",
            "[cbc,highs]",
            "--isolation",
            "in-process",
            "--output-dir",
            str(tmp_path),
            "--run-name",
            "study",
            "--no-progress",
        ]  # fmt: skip
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = captured.out
    for column in ("lp_feasible", "lp_s_cbc", "lp_s_highs", "pert_psnr_median", "ig_s"):
        assert column in out
    for column in ("unprotected", "time_limited", "rows_given", "load"):
        assert column in out
    result = json.loads((tmp_path / "study" / "fishing_study.json").read_text())
    assert (tmp_path / "study" / "summary.csv").is_file()
    config = result["config"]
    assert config["batch_sizes"] == [4] and config["train_epochs"] == [0, 1]
    assert config["solvers"] == ["cbc", "highs"] and config["ig_options"] == {"iterations": 2}
    assert config["dataset_options"] == {"mirrored": True}
    random, trained = result["states"]
    assert random["state"] == random["model_state"] == "random(0)"
    assert trained["state"] == f"trained-1ep {trained['model_state'][:16]}"
    assert result["test_accuracy"] == {s["state"]: s["test_accuracy"] for s in (random, trained)}
    summary = {line["state"]: line for line in result["summary"]}
    assert set(summary) == {random["state"], trained["state"]}
    for line in summary.values():
        assert line["batches"] == 2 and line["ig_batches"] == 1 and line["exan_batches"] == 2
        assert line["lp_feasible"] == 1.0 and line["B_correct"] == 1.0
        assert line["unprotected"] == 0 and 0 <= line["rows_given"] < 1
        assert line["psnr_trained_min"] >= 100.0  # exact on what the client trained on
        assert line["psnr_original_median"] <= line["psnr_trained_median"]
        assert line["linf_max"] < 0.1
