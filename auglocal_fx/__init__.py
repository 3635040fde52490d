"""auglocal-fx: turn any PyTorch ConvNet into a network trained by AugLocal local learning.

>>> from auglocal_fx import to_local
>>> local = to_local("timm:regnetx_004", d=6, input_size=(3, 64, 64))

``__all__`` is the promised API: the entry points a user needs. Everything else is importable
from its module (``auglocal_fx.planning.pyramid_depths``, ``auglocal_fx.specs.ModelSpec``,
``auglocal_fx.cka.BlockCKA``, ...); ``resolve_model`` is also importable from here, as
older code does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .budget import solve_budget
    from .cka import block_cka
    from .costs import cost_report
    from .errors import AugLocalError
    from .flops import count_flops
    from .local import LocalNet, load, to_local
    from .memory import measure_memory
    from .options import ConversionOptions
    from .probes import linear_probe
    from .specs import resolve_model
    from .training import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "to_local",
    "load",
    "LocalNet",
    "ConversionOptions",
    "train",
    "TrainConfig",
    "cost_report",
    "count_flops",
    "solve_budget",
    "measure_memory",
    "block_cka",
    "linear_probe",
    "AugLocalError",
    "__version__",
]

# Each name is imported from its module on first use (PEP 562): `auglocal-fx convert` then loads
# the conversion modules only, not the trainer's, the analysis' and their libraries.
_HOMES = {
    "to_local": "local", "load": "local", "LocalNet": "local", "ConversionOptions": "options",
    "train": "training", "TrainConfig": "training", "cost_report": "costs",
    "count_flops": "flops", "solve_budget": "budget", "measure_memory": "memory",
    "block_cka": "cka", "linear_probe": "probes", "AugLocalError": "errors",
    "resolve_model": "specs",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'auglocal_fx' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_HOMES))
