"""The leakage audit: what each party of a finished run could learn from what it received.

- :func:`audit_run` attacks a run folder where each attacker sits (distance correlation and
  model inversion at the receiver of activations; norm and direction label-leakage attacks at
  the sender of activations that gets gradients from someone else's labels) and writes
  ``RUN_DIR/audit/audit.json`` and the inversion figures;
- :func:`sweep` trains a plan at several strengths of one defense, audits each run and
  tabulates accuracy against leakage.

The per-wire measures are pure functions of tensors in :mod:`splitlearn.tools.audit.measures`; the
defenses and the attack AUCs come from :mod:`splitlearn.privacy`. Every attack is registered
(:mod:`splitlearn.tools.audit.attacks`: :func:`register_attack` adds one of one's own): model completion,
labels by clustering and attribute inference replay what their attacker recorded (``docs/privacy.md``).
"""

from .attacks import Attack, Target, attack_names, register_attack, unregister_attack
from .run import AuditError, audit_run
from .sweep import PARAMS, parse_sweep, sweep

__all__ = ["audit_run", "sweep", "parse_sweep", "PARAMS", "AuditError", "Attack", "Target", "register_attack",
           "unregister_attack", "attack_names"]
