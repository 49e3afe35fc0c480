"""``mixup-unmixing``: recover the mixes a MixUp client trained on, then separate them.

Defense it adapts to: :mod:`leakbench.defenses.mixup` (Zhang et al., ICLR 2018, as the privacy
baseline of Huang et al.'s InstaHide, ICML 2020). The attack is the decoding pipeline Carlini et
al. use against instance encodings ("Is Private Learning Possible with Instance Encoding?",
IEEE S&P 2021): recover the encodings, find how they share private images, solve for the
images. Without InstaHide's sign flips a MixUp encoding is a plain convex mixture, so the last
two steps are one linear unmixing (:mod:`leakbench.attacks._unmixing`).

Threat model: an honest-but-curious server that knows the architecture, the parameters, the
batch size and that the client trains on MixUp with k samples per mix (Kerckhoffs); the
partners and coefficients stay the client's. In one round every private sample enters k of the
B mixes, and nothing else is shared, so the attack works on that one round's mixes.

Steps, as :meth:`MixUpUnmixing.reconstruct` runs them:

1. the B mixes from the update (:func:`leakbench.attacks._unmixing.recover_trained_batch`:
   exclusive first-layer rows where the victim has a first ``nn.Linear`` with a bias, else
   DLG with its soft labels);
2. into pixel space, clamped to [0, 1];
3. when every mix was found and there is something to unmix (B > 1, k > 1): the separable
   non-negative factorisation Y = Λ X, X the private batch (successive projections, then
   alternating projected least squares); otherwise the mixes themselves are the answer (at
   B = 1 MixUp mixes nothing, and a missing mix leaves the system underdetermined);
4. back to model-input space.

Hyperparameters: ``k`` (2, the defense's), ``tolerance`` (1e-4: relative distance under which
two first-layer rows are the same mix; float32 ratios agree to ~1e-6), ``dlg_iterations``
(300, DLG's published budget, when step 1 falls back to DLG).
"""

from __future__ import annotations

from leakbench.attacks._unmixing import from_pixels, recover_trained_batch, to_pixels, unmix
from leakbench.interfaces import Attack, TrialFailure, positive_int
from leakbench.registry import register_attack
from leakbench.threat_model import Capability, Observation, Reconstruction


def check_unmixing_hyperparameters(k: int, tolerance: float, dlg_iterations: int) -> None:
    positive_int("k", k)
    positive_int("dlg_iterations", dlg_iterations)
    if not (isinstance(tolerance, int | float) and 0 < tolerance < 1):
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance!r}")


@register_attack("mixup-unmixing")
class MixUpUnmixing(Attack):
    requires = frozenset({Capability.BATCH_SIZE})
    threat_letter = "B"  # the SoK's letter of Inverting Gradients, whose objective it extends
    adapts_to = frozenset({"mixup"})
    threat_model = (
        "honest-but-curious server observing one FedSGD update of a MixUp client; knows the "
        "architecture, the parameters, the batch size and k (not the partners or coefficients)"
    )

    def __init__(self, k: int = 2, tolerance: float = 1e-4, dlg_iterations: int = 300) -> None:
        super().__init__(k=k, tolerance=tolerance, dlg_iterations=dlg_iterations)
        check_unmixing_hyperparameters(k, tolerance, dlg_iterations)
        self.k = k
        self.tolerance = float(tolerance)
        self.dlg_iterations = dlg_iterations

    def reconstruct(self, observation: Observation) -> Reconstruction:
        batch_size = observation.batch_size
        if batch_size is None:
            raise TrialFailure("mixup-unmixing needs the batch size")
        # 1. The mixes, 2. in pixels.
        mixes, info = recover_trained_batch(
            observation, batch_size, self.tolerance, {"iterations": self.dlg_iterations}
        )
        pixels = to_pixels(observation, mixes)
        # 3. Unmixing where it is determined.
        if min(self.k, batch_size) > 1 and len(pixels) == batch_size:
            pixels, mixing = unmix(pixels)
            info["mixing_matrix"] = mixing.round(6).tolist()
        else:
            info["unmixed"] = (
                "nothing to unmix"
                if min(self.k, batch_size) == 1
                else f"{len(pixels)} of {batch_size} mixes recovered: the mixes are returned"
            )
        # 4. Model-input space.
        return Reconstruction(images=from_pixels(observation, pixels, mixes), info=info)
