"""``idlg``: Improved Deep Leakage from Gradients (Zhao, Mopuri, Bilen 2020).

Paper: B. Zhao, K. R. Mopuri, H. Bilen, "iDLG: Improved Deep Leakage from Gradients",
arXiv:2001.02610, 2020.

Threat model: as DLG (honest-but-curious server, known architecture and parameters, one FedSGD
update, known batch size), restricted to a batch of one sample; the label is not given.

Label rule. For one sample with logits z = W h + b of the output layer and cross-entropy loss,
g = ∂ℓ/∂z = softmax(z) − e_y has exactly one negative entry, at the true class y
(g_y = p_y − 1 < 0, g_c = p_c > 0 otherwise). The output layer's gradients are

    ∇b = g,    ∇W = g hᵀ,    so    Σ_j ∇W[c, j] = g_c · Σ_j h_j.

* With a bias, ``label = argmin_c ∇b_c``. This is exact for any features h. Under a defense
  that perturbs the update several entries may be negative; the most negative is taken.
* Without a bias, iDLG's rule uses the row sums r_c = g_c · S with S = Σ_j h_j. If the features
  are non-negative (ReLU, sigmoid), S > 0 and ``label = argmin_c r_c``, the single negative row.
  Caveat: with possibly negative features (LeakyReLU, tanh, identity) S can be negative, which
  flips every sign. For K > 2 the pattern tells the cases apart: exactly one positive row sum
  and K − 1 negative ones means S < 0, and the label is the positive row. For K = 2 both
  patterns are "one negative, one positive" and the rule assumes S > 0 (it is then wrong
  whenever S < 0). Any other pattern (e.g. under noise) falls back to the most negative row.
* :class:`TrialFailure` when the rule does not apply: no ``nn.Linear`` producing the K logits,
  a known batch size other than 1, or no negative entry at all (e.g. a zero update).

"The output layer" is the last ``nn.Linear`` in ``model.modules()`` order, which must have
``out_features == num_classes`` (true for every network in the victim zoo).

Reconstruction: DLG (:mod:`leakbench.attacks.dlg`, same hyperparameters and budget use) with the
label fixed, i.e. minimising Σ_layers ‖∇θ CE(f_θ(x'), y) − ∇θ‖² over x' only.

Client protocols: all, as DLG (the update read through
:func:`leakbench.client.fedsgd_equivalent`, which also undoes the sign of a FedAvg delta
Δ = −η Σ_t ∇θ_t that the label rule reads); an aggregate qualifies only with one client of one
sample, the granted batch size being the K·B samples behind the sum.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from leakbench.attacks._gradient_matching import (
    gaussian_dummy,
    granted_batch_size,
    seeded_generator,
)
from leakbench.attacks.dlg import DLG
from leakbench.client import fedsgd_equivalent
from leakbench.interfaces import TrialFailure
from leakbench.registry import register_attack
from leakbench.threat_model import Observation, Reconstruction


def output_layer_gradients(observation: Observation) -> tuple[str, Tensor, Tensor | None]:
    """Name, weight gradient (K, d) and bias gradient (K,) or None of the output ``nn.Linear``."""
    linears = [(n, m) for n, m in observation.model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TrialFailure("the model has no nn.Linear output layer to read the label from")
    name, layer = linears[-1]
    if layer.out_features != observation.num_classes:
        raise TrialFailure(
            f"the last nn.Linear {name!r} has {layer.out_features} outputs, not the "
            f"{observation.num_classes} classes, so it is not the output layer"
        )
    prefix = f"{name}." if name else ""
    weight = observation.update[f"{prefix}weight"]
    bias = observation.update[f"{prefix}bias"] if layer.bias is not None else None
    return name, weight, bias


def idlg_label(observation: Observation) -> int:
    """The label of a single sample from the sign of the output layer's gradient (see module)."""
    if observation.batch_size not in (None, 1):
        raise TrialFailure(
            f"iDLG's label rule is for single samples; this batch has {observation.batch_size}"
        )
    name, weight_grad, bias_grad = output_layer_gradients(observation)
    if bias_grad is not None:
        statistic, source = bias_grad.double(), f"bias gradient of {name!r}"
    else:
        statistic, source = weight_grad.double().sum(dim=1), f"weight-gradient row sums of {name!r}"
        negatives = int((statistic < 0).sum())
        positives = int((statistic > 0).sum())
        num_classes = statistic.numel()
        if num_classes > 2 and positives == 1 and negatives == num_classes - 1:
            return int(statistic.argmax())  # the features sum negative: every sign is flipped
    if not bool((statistic < 0).any()):
        raise TrialFailure(f"the {source} has no negative entry, so iDLG's rule names no label")
    return int(statistic.argmin())


@register_attack("idlg")
class IDLG(DLG):
    max_batch_size = 1
    threat_model = (
        "honest-but-curious server observing one FedSGD update of a single sample; knows the "
        "architecture, the parameters and the batch size; label inferred analytically"
    )

    def reconstruct(self, observation: Observation) -> Reconstruction:
        observation = fedsgd_equivalent(observation)  # the label rule reads signs: undo Δ's
        batch_size = granted_batch_size(observation, "iDLG")
        if batch_size != 1:
            raise TrialFailure(
                f"iDLG's label rule is for single samples; this batch has {batch_size}"
            )
        label = idlg_label(observation)
        target = [g.detach() for g in observation.gradients()]
        generator = seeded_generator(observation)
        images = gaussian_dummy((1, *observation.input_shape), generator, like=target[0])
        labels = torch.tensor([label], device=target[0].device)
        info = self._match_gradients(observation, target, images, labels=labels)
        return Reconstruction(images=images.detach(), labels=labels, info=info)
