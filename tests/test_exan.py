"""The ExAN attack: exact recovery inside the insecure boundary, refusals, degenerate numerics."""

import functools

import pytest
import torch
from torch import nn

from leakbench.analysis.boundary import Study
from leakbench.analysis.exclusivity import analyse_exclusivity
from leakbench.attacks.exan import ExAN
from leakbench.attacks.exan_cnn import ExANCNN
from leakbench.client import build_victim, fedsgd_update
from leakbench.interfaces import TrialFailure, UnsupportedModelError
from leakbench.metrics import match, score_trial
from leakbench.registry import ATTACKS, DATAMODULES
from leakbench.threat_model import Budget, make_observation

SHAPE = (1, 28, 28)


def observe(model, images, labels, mean=(0.0,), std=(1.0,), num_classes=10):
    update = fedsgd_update(model, images, labels)
    return make_observation(
        model,
        update,
        granted=frozenset(),
        labels=labels,
        input_shape=tuple(images.shape[1:]),
        num_classes=num_classes,
        mean=mean,
        std=std,
        budget=Budget(),
        seed=0,
    )


@functools.cache
def batches_in_the_insecure_boundary(batch_size, bias, count, widths=(256, 256)):
    """(model, images, labels) of random-init FCNs on uniform inputs meeting the condition."""
    found = []
    seed = 0
    while len(found) < count:
        model = build_victim(
            "fcn", SHAPE, 10, seed=seed, dtype=torch.float64, widths=widths, bias=bias
        )
        g = torch.Generator().manual_seed(1000 + seed)
        images = torch.rand(batch_size, *SHAPE, generator=g, dtype=torch.float64)
        labels = torch.randint(10, (batch_size,), generator=g)
        if analyse_exclusivity(model, images).holds:  # harness-side selection of the protocol
            found.append((model, images, labels))
        seed += 1
    return found


def per_sample_errors(reconstruction, images, labels):
    """Matched MSE, scale-aligned MSE and label correctness per ground-truth sample."""
    recon = reconstruction.images.to(torch.float64)
    pairs = match(recon, images)
    assert sorted(pairs) == list(range(len(images)))
    rows = []
    for i, truth in enumerate(images):
        r, t = recon[pairs[i]].flatten(), truth.flatten()
        gain = (r @ t) / (r @ r)
        rows.append(
            (
                float(((r - t) ** 2).mean()),
                float(((gain * r - t) ** 2).mean()),
                int(reconstruction.labels[pairs[i]]) == int(labels[i]),
            )
        )
    return rows


def test_registered_without_batch_size_or_labels():
    assert ATTACKS.get("exan") is ExAN
    assert ExAN.requires == frozenset()


@pytest.mark.parametrize(("batch_size", "count"), [(1, 2), (2, 3), (4, 3), (8, 1)])
def test_exact_with_biases_batch_size_and_labels_inferred(batch_size, count):
    for model, images, labels in batches_in_the_insecure_boundary(batch_size, True, count):
        reconstruction = ExAN().reconstruct(observe(model, images, labels))
        assert reconstruction.batch_size == batch_size
        assert reconstruction.info["inputs_exact"] and reconstruction.info["loss_scale"] == "bias"
        assert reconstruction.info["gradient_residual"] < 1e-12
        for mse, _, label_ok in per_sample_errors(reconstruction, images, labels):
            assert mse < 1e-20
            assert label_ok


def test_without_biases_exact_up_to_a_per_sample_scale():
    for model, images, labels in batches_in_the_insecure_boundary(4, False, 3):
        reconstruction = ExAN().reconstruct(observe(model, images, labels))
        assert reconstruction.batch_size == 4
        assert reconstruction.info["loss_scale"] == "heuristic"
        errors = per_sample_errors(reconstruction, images, labels)
        assert all(aligned < 1e-20 and label_ok for _, aligned, label_ok in errors)
        # p_Y = 1/3 is a guess: the raw images carry a brightness error.
        assert max(raw for raw, _, _ in errors) > 1e-6


def test_assumed_label_probability_sets_the_scale_of_the_no_bias_answer():
    model, images, labels = batches_in_the_insecure_boundary(2, False, 1)[0]
    observation = observe(model, images, labels)
    low = ExAN(assumed_label_probability=0.2).reconstruct(observation).images
    high = ExAN(assumed_label_probability=0.6).reconstruct(observation).images
    # |g_y| = 1 - p_Y scales δ, and the input by its inverse: x(0.6) / x(0.2) = 0.8 / 0.4.
    torch.testing.assert_close(high, low * 2.0, rtol=1e-9, atol=1e-12)


def test_float32_lfw_subset_binary_task_is_exact_to_float32_precision():
    # K = 2: all loss vectors are collinear, so groups of shared units exist; the scale test
    # must drop them for the batch size to come out right.
    datamodule = DATAMODULES.get("lfw-subset")(batch_size=4, num_trials=6, seed=0, split="train")
    model = build_victim("fcn-exan", datamodule.input_shape, 2, seed=0)
    dropped = 0
    attacked = 0
    for trial in datamodule.trials():
        images, labels = trial["images"], trial["labels"]
        if not analyse_exclusivity(model, images).holds:
            continue
        attacked += 1
        observation = observe(model, images, labels, datamodule.mean, datamodule.std, 2)
        reconstruction = ExAN().reconstruct(observation)
        dropped += reconstruction.info["groups_dropped_by_scale_test"]
        scores = score_trial(
            truth_images=images,
            truth_labels=labels,
            sample_ids=trial["sample_ids"],
            mean=datamodule.mean,
            std=datamodule.std,
            reconstructed_images=reconstruction.images,
            reconstructed_labels=reconstruction.labels,
            inferred_batch_size=reconstruction.batch_size,
        )
        assert scores["batch_size_correct"] and scores["label_accuracy"] == 1.0
        assert min(s["psnr"] for s in scores["samples"]) >= 60.0
    assert attacked >= 4 and dropped > 0


@functools.cache
def confident_trained_victim():
    """d-512-2 with biases trained to 100 % on lfw-subset, float64: many held-out faces get
    p(y) within 1e-8 of 1 (loss vectors 1e-8 of their batch mates')."""
    study = Study(dtype=torch.float64, split="test")
    return study, study.state(40, lr=0.2).victim.build()


def test_exact_on_a_confident_trained_victim():
    # Fixed grouping tolerances took a confident sample's shared units for ExANs of its batch
    # mate (MSE 1e-15 instead of exact) or dropped the confident sample; tolerances relative to
    # each candidate's scale keep every sample exact.
    study, model = confident_trained_victim()
    dm = study.reference
    attacked = confident = 0
    for trial in study.trials(4, 40):
        images, labels = trial["images"], trial["labels"]
        if not analyse_exclusivity(model, images).holds:
            continue
        attacked += 1
        with torch.no_grad():
            p = model(images).softmax(dim=1).gather(1, labels[:, None]).flatten()
        confident += bool((1 - p < 1e-8).any())
        reconstruction = ExAN().reconstruct(observe(model, images, labels, dm.mean, dm.std, 2))
        assert reconstruction.batch_size == 4
        errors = per_sample_errors(reconstruction, images, labels)  # every sample is found
        assert all(mse < 1e-20 and label_ok for mse, _, label_ok in errors)
    assert attacked >= 30 and confident >= 10


def test_same_observation_gives_the_same_answer():
    model, images, labels = batches_in_the_insecure_boundary(2, True, 1)[0]
    observation = observe(model, images, labels)
    first, second = ExAN().reconstruct(observation), ExAN().reconstruct(observation)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2)),
            "layer 2 (Sigmoid) is not supported by the ExAN attack",
        ),
        (
            nn.Sequential(nn.Flatten(), nn.Linear(4, 2)),
            "needs at least one ReLU layer between Linear layers; the fully connected part is a",
        ),
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)),
            "layer 0 (Conv2d) is not supported by the ExAN attack",
        ),
        (
            nn.Sequential(
                nn.Flatten(), nn.Linear(4, 3), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)
            ),
            "layer 2 (Linear) follows a Linear without a ReLU",
        ),
        (
            nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU()),
            "layer 2 (ReLU) is the last layer",
        ),
    ],
)
def test_unsupported_models_are_refused_naming_the_layer(model, message):
    with pytest.raises(
        UnsupportedModelError, match=message.replace("(", r"\(").replace(")", r"\)")
    ):
        ExAN().check_model(model)


def test_non_sequential_victims_are_refused():
    with pytest.raises(UnsupportedModelError, match="needs an nn.Sequential victim; got ResNet"):
        ExAN().check_model(build_victim("resnet18", (3, 8, 8), 2, seed=0))


def test_missing_gradient_tensor_is_refused_naming_the_layer():
    model, images, labels = batches_in_the_insecure_boundary(2, True, 1)[0]
    observation = observe(model, images, labels)
    del observation.update["3.bias"]  # the second hidden layer's bias gradient
    with pytest.raises(ValueError, match=r"lacks the bias gradient of layer 3 \(Linear\)"):
        ExAN().reconstruct(observation)


def test_zero_update_fails_the_trial_with_a_reason():
    model, images, labels = batches_in_the_insecure_boundary(2, True, 1)[0]
    observation = observe(model, images, labels)
    for g in observation.update.values():
        g.zero_()
    with pytest.raises(TrialFailure, match="no unit of the last ReLU layer has a non-zero"):
        ExAN().reconstruct(observation)


def test_zero_bias_gradients_at_every_exan_fail_the_trial():
    model, images, labels = batches_in_the_insecure_boundary(1, True, 1)[0]
    observation = observe(model, images, labels)
    observation.update["3.bias"].zero_()  # a single sample: every active unit is its ExAN
    with pytest.raises(TrialFailure, match="zero bias gradient"):
        ExAN().reconstruct(observation)


def test_outside_the_boundary_returned_images_are_exact_and_the_batch_size_right():
    # B = 8 on lfw-subset with d-512-2 rarely meets the condition: samples with fewer than two
    # ExANs cannot be found, but the scale test still infers M = 8, and every image the attack
    # returns is exact (or the trial fails); never a wrong image.
    datamodule = DATAMODULES.get("lfw-subset")(batch_size=8, num_trials=6, seed=0)
    model = build_victim("fcn-exan", datamodule.input_shape, 2, seed=0, dtype=torch.float64)
    partial = 0
    for trial in datamodule.trials():
        images, labels = trial["images"].double(), trial["labels"]
        assert not analyse_exclusivity(model, images).holds
        observation = observe(model, images, labels, datamodule.mean, datamodule.std, 2)
        try:
            reconstruction = ExAN().reconstruct(observation)
        except TrialFailure:
            continue
        assert reconstruction.batch_size == 8
        partial += 0 < len(reconstruction.images) < 8
        pairs = match(reconstruction.images, images)  # {truth: reconstruction}
        assert len(pairs) == len(reconstruction.images)
        for truth, recon in pairs.items():
            assert float(((reconstruction.images[recon] - images[truth]) ** 2).mean()) < 1e-20
            assert int(reconstruction.labels[recon]) == int(labels[truth])
        assert reconstruction.info["gradient_residual"] > 1e-3  # it says samples are missing
    assert partial >= 3


def test_without_biases_missing_samples_fail_the_trial_instead_of_a_wrong_image():
    outcomes = set()
    for seed in range(8):
        model = build_victim(
            "fcn", SHAPE, 10, seed=seed, dtype=torch.float64, widths=(256, 256), bias=False
        )
        g = torch.Generator().manual_seed(seed)
        images = torch.rand(8, *SHAPE, generator=g, dtype=torch.float64)
        labels = torch.randint(10, (8,), generator=g)
        try:
            reconstruction = ExAN().reconstruct(observe(model, images, labels))
        except TrialFailure as failure:
            outcomes.add("failed")
            assert analyse_exclusivity(model, images).holds is False, str(failure)
            continue
        outcomes.add("answered")
        assert all(a < 1e-20 for _, a, _ in per_sample_errors(reconstruction, images, labels))
    assert outcomes == {"failed", "answered"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tolerance": 0.0}, "tolerance must be in"),
        ({"min_group_size": 0}, "min_group_size must be at least 1"),
        ({"assumed_label_probability": 1.0}, "assumed_label_probability must be in"),
    ],
)
def test_bad_hyperparameters_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        ExAN(**options)


# ExAN-CNN (our extension)


def small_cnn(seed, bias=True, channels=8):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=bias),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * 36, 64, bias=bias),
        nn.ReLU(),
        nn.Linear(64, 10, bias=bias),
    ).double()


def cnn_batches(batch_size, bias, count):
    found, seed = [], 0
    while len(found) < count:
        model = small_cnn(seed, bias)
        g = torch.Generator().manual_seed(seed)
        images = torch.rand(batch_size, 3, 6, 6, generator=g, dtype=torch.float64)
        labels = torch.randint(10, (batch_size,), generator=g)
        if analyse_exclusivity(model, images).holds:
            found.append((model, images, labels))
        seed += 1
    return found


@pytest.mark.parametrize("batch_size", [1, 2])
def test_exan_cnn_is_exact_on_a_small_conv_net_with_biases(batch_size):
    assert ATTACKS.get("exan-cnn") is ExANCNN and ExANCNN.requires == frozenset()
    for model, images, labels in cnn_batches(batch_size, True, 3):
        observation = observe(model, images, labels, (0.0,) * 3, (1.0,) * 3)
        reconstruction = ExANCNN().reconstruct(observation)
        assert reconstruction.batch_size == batch_size
        layer = reconstruction.info["conv_layers"][0]
        assert layer["rank"] == layer["unknowns"] == batch_size * 3 * 6 * 6
        for mse, _, label_ok in per_sample_errors(reconstruction, images, labels):
            assert mse < 1e-20 and label_ok


def test_exan_cnn_without_biases_is_exact_up_to_a_per_sample_scale():
    for model, images, labels in cnn_batches(2, False, 2):
        observation = observe(model, images, labels, (0.0,) * 3, (1.0,) * 3)
        errors = per_sample_errors(ExANCNN().reconstruct(observation), images, labels)
        assert all(aligned < 1e-20 and label_ok for _, aligned, label_ok in errors)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        (
            [nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 2)],
            r"layer 2 \(MaxPool2d\) is not supported by ExAN-CNN \(our extension\)",
        ),
        (
            [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2)],
            r"layer 0 \(Conv2d\) is followed by layer 1 \(BatchNorm2d\)",
        ),
        (
            [nn.Conv2d(3, 4, 3, dilation=2), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2)],
            r"layer 0 \(Conv2d\): grouped or dilated convolutions are not supported",
        ),
        (
            [nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)],
            "needs at least one Conv2d before the Flatten",
        ),
        (
            [nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2)],
            "needs at least one ReLU layer between Linear layers",
        ),
    ],
)
def test_exan_cnn_refuses_unsupported_layers_naming_them(layers, message):
    with pytest.raises(UnsupportedModelError, match=message):
        ExANCNN().check_model(nn.Sequential(*layers))


def test_exan_cnn_refuses_a_missing_conv_gradient():
    model, images, labels = cnn_batches(1, True, 1)[0]
    observation = observe(model, images, labels, (0.0,) * 3, (1.0,) * 3)
    del observation.update["0.weight"]
    with pytest.raises(ValueError, match=r"lacks the weight gradient of layer 0 \(Conv2d\)"):
        ExANCNN().reconstruct(observation)
