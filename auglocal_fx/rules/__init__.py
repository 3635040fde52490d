"""Local learning rules behind one interface: AugLocal and the paper's comparison systems.

A rule decides which blocks are trained locally and builds the auxiliary network of each
(``LocalRule``); a rule with a loss beyond cross-entropy returns a
``RuleAux`` whose ``local_loss`` the training step calls. One
module per rule, registered with ``register_rule``; a new rule
is one more file (imported here for the built-in ones, by its user otherwise).
"""

from __future__ import annotations

from . import augmented, dgl, infopro, predsim  # noqa: F401 - each registers its rules
from .augmented import AugLocalInfoProRule, AugLocalRule
from .base import LocalRule, RuleAux, RuleContext
from .dgl import DGLRule
from .infopro import InfoProRule
from .predsim import PredSimRule
from .registry import RULES, get_rule, register_rule, rule_names, unregister_rule

__all__ = ["RULES", "get_rule", "register_rule", "unregister_rule", "rule_names", "LocalRule", "RuleAux",
           "RuleContext", "AugLocalRule", "AugLocalInfoProRule", "DGLRule", "InfoProRule", "PredSimRule"]
