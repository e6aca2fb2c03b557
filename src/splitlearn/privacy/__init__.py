"""Privacy defenses for split learning: pure tensor-in, tensor-out functions, and the built-in
wire defenses made of them (:mod:`.defenses`), registered in the core's registry
(:mod:`splitlearn.core.defense`) through which the engine applies them per wire.

- :mod:`.nopeek`: distance correlation (NoPeek loss term on the cut activations);
- :mod:`.noise`: per-sample clipping + Gaussian noise on activations, and an RDP accountant;
- :mod:`.labels`: label protection (max norm, Marvell-style noise, randomized response);
- :mod:`.attacks`: the norm and direction label-leakage attacks used to measure them.
"""

from .attacks import direction_attack_auc, norm_attack_auc
from .labels import marvell, max_norm, randomized_response
from .noise import PrivacyAccountant, clip_and_noise
from .nopeek import distance_correlation

__all__ = ["distance_correlation", "clip_and_noise", "PrivacyAccountant", "max_norm", "marvell",
           "randomized_response", "norm_attack_auc", "direction_attack_auc"]
