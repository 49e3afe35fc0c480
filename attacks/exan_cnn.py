"""``exan-cnn``: ExAN-CNN (our extension) — the ExAN attack on small ReLU CNNs.

OUR EXTENSION of Pan et al., "Exploring the Security Boundary of Data Reconstruction via Neuron
Exclusivity Analysis" (USENIX Security 2022). The paper reports CNN results (VGG-13 on ISIC) but
how it handles convolutions could not be recovered from its text; this is our design (ExAN on
the fully connected head, then linear systems for the convolutions), not the paper's method.

Threat model: as :mod:`leakbench.attacks.exan` (honest-but-curious server, known architecture
and parameters, one FedSGD update; batch size and labels inferred, not given). Victims:
``nn.Sequential`` of (``Conv2d``, ``ReLU``) × C, ``Flatten``, then the FCN head of the ExAN
attack, (``Linear``, ``ReLU``) × L, ``Linear`` (C, L ≥ 1). Max-pooling, BatchNorm, grouped or
dilated convolutions and non-zero padding modes are refused, naming the layer.

Method (float64):

1. The head. The ExAN attack (:func:`leakbench.attacks.exan.recover_fcn`) recovers, from the
   head's gradients alone, the head inputs — the flattened output h_m^C of the last conv ReLU,
   exact with a bias in the head's first Linear — the labels, the batch size M, the loss
   vectors g_m and the head's activation patterns. ExAN-CNN needs every sample (the conv weight
   gradients mix all of them), so a batch whose samples are not all found fails.
2. The conv stack, top-down, by linear systems restricted to the recovered ReLU patterns. For
   conv layer c with output pre-activation a_m = W ∗ x_m + b, ReLU output h_m and
   k_m = ∂ℓ_m/∂a_m = 1[h_m > 0] ⊙ ∂ℓ_m/∂h_m (back-propagated from the head through the
   recovered patterns; ``torch.nn.grad.conv2d_input`` for the step to the layer below), the
   unknowns are the inputs x_1..x_M of the layer (padding fixed to zero) and the equations are
   * weight constraints, one row per ACTIVE output unit u of each sample: (W ∗ x_m)[u] =
     h_m[u] − b[u] — at an active unit the pre-activation is known exactly;
   * gradient constraints, C_out·C_in·k_h·k_w rows shared by the batch:
     M ∇W = Σ_m K(k_m) x_m, with K(k) R-GAP's gradient block.
   Inactive units give only inequalities, (W ∗ x_m)[u] + b[u] ≤ 0; they are not used in the
   solve but checked: a solution that violates one, or leaves a relative residual above
   ``tolerance``, fails the trial (a misread pattern, e.g. a tiny activation in float32).
   The blocks come from the R-GAP conv-system module (:mod:`leakbench.analysis.conv_system`:
   ``ConvGeometry``, ``gradient_block``, ``weight_constraints``); the batch coupling of the
   gradient rows and the ReLU row selection are assembled here and solved by LAPACK least
   squares (``gelsd``). A rank-deficient system fails the trial. The solution's entries above
   ``tolerance`` times the sample's largest are the pattern of the conv ReLU below (the head
   inputs hold exact zeros, so there any positive entry counts).

With biases in the head's first Linear and last ReLU layer everything is exact; without biases
anywhere the answer is exact up to a per-sample scale (the ExAN heuristic's scale carries
through the homogeneous conv stack unchanged).

Hyperparameters: those of ``exan``, plus ``max_unknowns`` (20 000): the largest conv system
(M · C_in · H · W unknowns) solved densely; larger ones fail the trial.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from leakbench.analysis.conv_system import ConvGeometry, gradient_block, weight_constraints
from leakbench.attacks.exan import (
    ExAN,
    LayerTensors,
    checked_residual,
    describe,
    fcn_linear_layers,
    first_layer_deltas,
    gather_layers,
    recover_fcn,
    resolve_tolerance,
    sequential_children,
    update_precision,
)
from leakbench.interfaces import TrialFailure, UnsupportedModelError, positive_int
from leakbench.registry import register_attack
from leakbench.threat_model import Observation, Reconstruction

NAME = "ExAN-CNN (our extension)"


def cnn_layers(model: nn.Module) -> tuple[list[tuple[str, nn.Conv2d]], list[tuple[str, nn.Linear]]]:
    """The Conv2d layers and the head's Linear layers of a supported CNN (refuses, naming)."""
    children = sequential_children(model, NAME)
    convs: list[tuple[str, nn.Conv2d]] = []
    i = 0
    while i < len(children) and not isinstance(children[i][1], nn.Flatten):
        name, module = children[i]
        if type(module) is not nn.Conv2d:
            raise UnsupportedModelError(
                f"{describe(name, module)} is not supported by {NAME}: the convolutional part "
                f"may hold only Conv2d → ReLU pairs"
            )
        try:
            ConvGeometry.of(module, (1, 1))
        except ValueError as exc:
            raise UnsupportedModelError(f"{describe(name, module)}: {exc} by {NAME}") from None
        if i + 1 == len(children) or type(children[i + 1][1]) is not nn.ReLU:
            following = "nothing" if i + 1 == len(children) else describe(*children[i + 1])
            raise UnsupportedModelError(
                f"{describe(name, module)} is followed by {following}; {NAME} needs every "
                f"Conv2d followed directly by a ReLU"
            )
        convs.append((name, module))
        i += 2
    if i == len(children):
        raise UnsupportedModelError(f"{NAME} needs a Flatten before the fully connected head")
    if not convs:
        raise UnsupportedModelError(
            f"{NAME} needs at least one Conv2d before the Flatten; use 'exan' for FCNs"
        )
    flatten_name, flatten = children[i]
    if flatten.start_dim != 1:
        raise UnsupportedModelError(
            f"{describe(flatten_name, flatten)} flattens from dimension {flatten.start_dim}; "
            f"{NAME} needs Flatten(start_dim=1)"
        )
    return convs, fcn_linear_layers(children[i + 1 :], NAME)


def solve_conv_batch(
    geom: ConvGeometry,
    layer: LayerTensors,
    outputs: Tensor,
    active: Tensor,
    deltas: Tensor,
    batch_size: int,
    rank_tolerance: float,
    tolerance: float,
) -> tuple[Tensor, dict[str, Any]]:
    """Inputs (N, C_in, H, W) of one conv layer from its ReLU-restricted system (step 2).

    ``outputs``: ReLU outputs h (N, C_out, H_out, W_out); ``active``: their pattern;
    ``deltas``: k = ∂ℓ_m/∂a_m. The unknowns are ordered sample by sample, each (c, y, x).
    """
    n = geom.unknowns_interior
    interior = geom.interior_index >= 0
    weight = layer.weight.numpy()
    gradient_rows = sp.hstack(
        [
            sp.kron(sp.identity(geom.in_channels), gradient_block(geom, k.numpy())[:, interior])
            for k in deltas
        ]
    )
    # Rows (c, f, u, v): the equations of input channel c read only that channel of each sample.
    gradient_rhs = (batch_size * layer.weight_grad).reshape(geom.out_channels, geom.in_channels, -1)
    weight_rows, weight_rhs = [], []
    bias = 0.0 if layer.bias is None else layer.bias[:, None, None]
    for h, mask in zip(outputs, active, strict=True):
        weight_rows.append(weight_constraints(geom, weight, mask.numpy())[:, geom.interior_columns])
        weight_rhs.append((h - bias)[mask].numpy())
    matrix = sp.vstack([gradient_rows, sp.block_diag(weight_rows)]).toarray()
    rhs = np.concatenate([gradient_rhs.transpose(0, 1).numpy().ravel(), *weight_rhs])
    solution, _, rank, _ = scipy.linalg.lstsq(
        matrix, rhs, cond=rank_tolerance, lapack_driver="gelsd", check_finite=False
    )
    unknowns = len(outputs) * n
    if rank < unknowns:
        raise TrialFailure(
            f"{layer.name}: the ReLU-restricted system has rank {rank} < {unknowns} unknowns "
            f"({int(active.sum())} active units, {geom.gradient_rows} gradient rows)"
        )
    residual = float(np.linalg.norm(matrix @ solution - rhs)) / (float(np.linalg.norm(rhs)) or 1.0)
    inputs = torch.from_numpy(solution).reshape(len(outputs), geom.in_channels, *geom.in_hw)
    pre = torch.nn.functional.conv2d(
        inputs, layer.weight, layer.bias, stride=geom.stride, padding=geom.padding
    )
    scale = pre.abs().amax(dim=(1, 2, 3), keepdim=True)
    violated = int(((pre > tolerance * scale) & ~active).sum())
    if violated or residual > tolerance:
        raise TrialFailure(
            f"{layer.name}: the least-squares input is inconsistent with the recovered pattern "
            f"(relative residual {residual:.1e}, {violated} inactive units it activates)"
        )
    return inputs, {
        "layer": layer.name,
        "unknowns": unknowns,
        "rows": matrix.shape[0],
        "rank": int(rank),
        "relative_residual": residual,
    }


@register_attack("exan-cnn")
class ExANCNN(ExAN):
    threat_model = (
        "honest-but-curious server observing one FedSGD update of a small ReLU CNN "
        "(Conv2d/ReLU stack, FC head); knows the architecture and the parameters; infers the "
        "batch size and the labels. ExAN-CNN is our extension, not the paper's method"
    )

    def __init__(self, max_unknowns: int = 20_000, **exan_options: Any) -> None:
        """``exan_options`` are the ExAN attack's hyperparameters (tolerance, ...)."""
        super().__init__(**exan_options)
        self.max_unknowns = positive_int("max_unknowns", max_unknowns)
        self.hparams["max_unknowns"] = max_unknowns

    def check_model(self, model: nn.Module) -> None:
        cnn_layers(model)

    def reconstruct(self, observation: Observation) -> Reconstruction:
        convs, linears = cnn_layers(observation.model)
        geometries = []
        channels, hw = observation.input_shape[0], tuple(observation.input_shape[1:])
        for name, conv in convs:
            if conv.in_channels != channels:
                raise ValueError(
                    f"{describe(name, conv)} takes {conv.in_channels} channels, got {channels}"
                )
            geometries.append(ConvGeometry.of(conv, hw))  # type: ignore[arg-type]
            channels, hw = conv.out_channels, geometries[-1].out_hw
        features = channels * math.prod(hw)
        if linears[0][1].in_features != features:
            raise ValueError(
                f"{describe(*linears[0])} takes {linears[0][1].in_features} features, but the "
                f"conv stack gives {features} for inputs of shape {observation.input_shape}"
            )
        conv_layers = gather_layers(observation, list(convs), NAME)
        head = gather_layers(observation, list(linears), NAME)
        tolerance = resolve_tolerance(self.tolerance, observation.dtype)
        precision = update_precision(observation.dtype)
        recovery = recover_fcn(
            head,
            tolerance=tolerance,
            min_group_size=self.min_group_size,
            assumed_label_probability=self.assumed_label_probability,
            support_tolerance=self.support_tolerance,
            rank_tolerance=self.rank_tolerance,
            precision=precision,
        )
        found, batch_size = len(recovery.inputs), recovery.batch_size
        if found != batch_size:
            raise TrialFailure(
                f"the head attack found {found} of {batch_size} samples; {NAME} needs all of "
                f"them because the conv weight gradients mix every sample"
            )
        unknowns = batch_size * max(g.unknowns_interior for g in geometries)
        if unknowns > self.max_unknowns:
            raise TrialFailure(
                f"a conv system would have {unknowns} unknowns, more than max_unknowns = "
                f"{self.max_unknowns}"
            )
        outputs = recovery.inputs.reshape(found, channels, *hw)
        grads = first_layer_deltas(head, recovery.patterns, recovery.loss_vectors) @ head[0].weight
        grads = grads.reshape(outputs.shape)
        layers_info = []
        # The head inputs hold exact zeros at inactive units; a solved layer input holds
        # round-off there, so below the head activity is read with a relative threshold.
        active = outputs > 0
        for geom, layer in zip(reversed(geometries), reversed(conv_layers), strict=True):
            deltas = grads * active
            inputs, layer_info = solve_conv_batch(
                geom, layer, outputs, active, deltas, batch_size, self.rank_tolerance, tolerance
            )
            layers_info.insert(0, layer_info)
            grads = torch.nn.grad.conv2d_input(
                inputs.shape, layer.weight, deltas, stride=geom.stride, padding=geom.padding
            )
            outputs = inputs
            active = outputs > tolerance * outputs.abs().amax(dim=(1, 2, 3), keepdim=True)
        info = dict(recovery.info)
        info["conv_layers"] = layers_info
        info["gradient_residual"] = checked_residual(
            observation, outputs, recovery, tolerance, precision
        )
        return Reconstruction(
            images=outputs, labels=recovery.labels, batch_size=batch_size, info=info
        )
