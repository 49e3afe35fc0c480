"""``improved-rgap``: the SSRAS reconstruction system with Improved R-GAP (Sensors, 2022).

Paper: "Recover User's Private Training Image Data by Gradient in Federated Learning",
Sensors 22(19):7157, 2022, doi:10.3390/s22197157. Only its abstract and introduction could be
read: SSRAS reconstructs a single sample with or without a known label, with or
without biases, choosing between bias attacks and linear-equation solvers, and "Improved R-GAP
can utilize DLG algorithm to derive ground truth". The routing below is our reconstruction of
that system from those sections, not the paper's text.

Threat model: an honest-but-curious server that knows the architecture and the parameters and
observes one FedSGD update of a single sample (SSRAS reconstructs single samples; a granted
batch size above 1 is refused); the label is not given.

Routes, decided from the model alone (so ``check_model`` refuses up front a model no route can
handle) and reported per trial in ``info["route"]``:

1. ``"bias"``: the first trainable layer is ``nn.Linear`` with a bias. The bias attack
   (Phong et al.; :mod:`leakbench.attacks.bias`) is exact for one sample. The label is added
   when iDLG's rule applies (see 2).
2. ``"idlg+rgap"``: otherwise, when the label follows analytically from the output layer by
   iDLG's rule (:func:`leakbench.attacks.idlg.idlg_label`): always with an output bias
   (``∇b = softmax − e_y``); for K > 2 without a bias (one row sum differs in sign from all
   others, whatever the sign of the features' sum); for K = 2 without a bias only when the
   features entering the output layer are non-negative (a Sigmoid or ReLU right before it).
   Then R-GAP (:mod:`leakbench.attacks.rgap`) runs with that label.
3. ``"dlg+rgap"``: otherwise DLG (:class:`leakbench.attacks.dlg.DLG`: dummy image and soft
   label optimised jointly, ``dlg_iterations`` L-BFGS steps drawn from the trial budget) gives
   the label, and R-GAP runs with it. SSRAS says DLG derives "the ground truth"; we take only
   its label: given the label, R-GAP's last-layer solve is exact, where DLG's image and logits
   are approximations. If DLG fails (non-finite loss), R-GAP infers the label itself and
   ``info["dlg_failure"]`` says why.

Routes 2 and 3 need an invertible network (R-GAP's conditions; a ReLU, pooling or batch-norm
layer is refused up front, naming it).

Hyperparameters: ``dlg_iterations`` (300, DLG's default), ``root`` (R-GAP's root policy,
"auto").
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from leakbench.analysis.rank import network_layers
from leakbench.attacks.bias import BiasAttack, first_linear_layer
from leakbench.attacks.dlg import DLG
from leakbench.attacks.idlg import idlg_label
from leakbench.attacks.rgap import ROOTS, check_invertible, rgap_reconstruct
from leakbench.interfaces import Attack, TrialFailure, UnsupportedModelError, positive_int
from leakbench.registry import register_attack
from leakbench.threat_model import Observation, Reconstruction

_NON_NEGATIVE = (nn.Sigmoid, nn.ReLU)


def analytic_label(model: nn.Module) -> bool:
    """Whether iDLG's rule names the label of one sample for this network (see the module)."""
    try:
        layers = network_layers(model, "SSRAS")
    except UnsupportedModelError:
        return False
    layers = [(n, m) for n, m in layers if not isinstance(m, nn.Flatten)]
    _, output = layers[-1]
    if output.bias is not None or output.out_features > 2:
        return True
    return len(layers) > 1 and isinstance(layers[-2][1], _NON_NEGATIVE)


def ssras_route(model: nn.Module) -> str:
    """The route this model takes; refuses, naming the layer, a model no route handles."""
    try:
        first_linear_layer(model)
        return "bias"
    except UnsupportedModelError:
        pass
    check_invertible(model, "Improved R-GAP")
    return "idlg+rgap" if analytic_label(model) else "dlg+rgap"


@register_attack("improved-rgap")
class ImprovedRGAP(Attack):
    requires = frozenset()
    # SoK letter: B, as the SoK gives R-GAP.
    threat_letter = "B"
    max_batch_size = 1  # SSRAS is a single-sample system
    threat_model = (
        "honest-but-curious server observing one FedSGD update of a single sample; knows the "
        "architecture and the parameters; label unknown (iDLG rule or DLG)"
    )

    def __init__(self, dlg_iterations: int = 300, root: str = "auto") -> None:
        super().__init__(dlg_iterations=dlg_iterations, root=root)
        positive_int("dlg_iterations", dlg_iterations)
        if root not in ROOTS:
            raise ValueError(f"root must be one of {ROOTS}, got {root!r}")
        self.dlg_iterations = dlg_iterations
        self.root = root

    def check_model(self, model: nn.Module) -> None:
        ssras_route(model)

    def reconstruct(self, observation: Observation) -> Reconstruction:
        if observation.batch_size not in (None, 1):
            raise TrialFailure(
                f"SSRAS reconstructs single samples; this batch has {observation.batch_size}"
            )
        model = observation.model
        route = ssras_route(model)
        if route == "bias":
            result = BiasAttack().reconstruct(observation)
            labels = None
            if analytic_label(model):
                labels = torch.tensor([idlg_label(observation)])
            return Reconstruction(
                images=result.images, labels=labels, info={"route": route, **result.info}
            )
        info: dict[str, object] = {"route": route}
        label: int | None
        if route == "idlg+rgap":
            label = idlg_label(observation)
            info["label_source"] = "iDLG rule"
        else:
            single = dataclasses.replace(observation, batch_size=1)
            try:
                dlg = DLG(iterations=self.dlg_iterations).reconstruct(single)
            except TrialFailure as err:
                label = None
                info.update(label_source="R-GAP (DLG failed)", dlg_failure=str(err))
            else:
                assert dlg.labels is not None
                label = int(dlg.labels[0])
                info.update(label_source="DLG", dlg=dlg.info)
        result = rgap_reconstruct(observation, root=self.root, label=label)
        return Reconstruction(
            images=result.images, labels=result.labels, info={**info, **result.info}
        )
