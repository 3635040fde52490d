"""The registry of local learning rules: each rule registers itself with what others read.

A rule is a ``LocalRule`` subclass whose class attributes say what
the conversion, the reports and the CLI need (``name``, ``label``, ``uses_depth``,
``second_loss``, ``order``); decorating it with ``register_rule`` makes it a value of
``to_local(rule=)``, ``report --rules`` and ``train --rule``. Adding a rule is one new file.
"""

from __future__ import annotations

from typing import Dict, Tuple, Type

from ..errors import AugLocalError
from .base import LocalRule

__all__ = ["RULES", "register_rule", "unregister_rule", "get_rule", "rule_names"]

# Name -> rule, listed by ``order`` then registration; mutated in place, so a module that
# imported it sees later registrations.
RULES: Dict[str, LocalRule] = {}


def register_rule(rule_class: Type[LocalRule]) -> Type[LocalRule]:
    """Class decorator: register one instance of ``rule_class`` under its ``name``.

    Raises:
        AugLocalError: for a rule without a name or label, or a name already taken.
    """
    rule = rule_class()
    if not rule.name or not rule.label:
        raise AugLocalError(f"rule {rule_class.__name__} needs a name and a label: set both class attributes")
    if rule.name in RULES or rule.name in ("bp", "gc"):
        raise AugLocalError(f"a rule called {rule.name!r} is already registered: choose another name")
    ranked = sorted([*RULES.values(), rule], key=lambda r: r.order)  # stable: ties keep registration order
    RULES.clear()
    RULES.update((r.name, r) for r in ranked)
    return rule_class


def unregister_rule(name: str) -> None:
    """Remove the rule called ``name`` (a test's toy rule); unknown names are an error."""
    get_rule(name)
    del RULES[name]


def get_rule(name: str) -> LocalRule:
    """The rule called ``name``.

    Raises:
        AugLocalError: for an unknown name.
    """
    if name not in RULES:
        raise AugLocalError(f"unknown local learning rule {name!r}: choose one of {', '.join(RULES)}")
    return RULES[name]


def rule_names() -> Tuple[str, ...]:
    """The registered rules' names, in listing order."""
    return tuple(RULES)
