"""Local learning rules behind one interface: AugLocal and the paper's comparison systems.

A rule decides which blocks are trained locally and builds the auxiliary network of each
(:class:`~auglocal_fx.rules.base.LocalRule`); a rule with a loss beyond cross-entropy returns a
:class:`~auglocal_fx.rules.base.RuleAux` whose ``local_loss`` the training step calls. One
module per rule; a new rule is one more file and one line in :data:`RULES`.
"""

from __future__ import annotations

from typing import Dict

from ..errors import AugLocalError
from .augmented import AugLocalInfoProRule, AugLocalRule
from .base import LocalRule, RuleAux, RuleContext
from .dgl import DGLRule
from .infopro import InfoProRule
from .predsim import PredSimRule

__all__ = ["RULES", "get_rule", "LocalRule", "RuleAux", "RuleContext"]

RULES: Dict[str, LocalRule] = {rule.name: rule for rule in (
    AugLocalRule(), DGLRule(), PredSimRule(), InfoProRule(), AugLocalInfoProRule())}


def get_rule(name: str) -> LocalRule:
    """The rule called ``name``.

    Raises:
        AugLocalError: for an unknown name.
    """
    if name not in RULES:
        raise AugLocalError(f"unknown local learning rule {name!r}: choose one of {', '.join(RULES)}")
    return RULES[name]
