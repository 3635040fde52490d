"""auglocal-fx: turn any PyTorch ConvNet into a network trained by AugLocal local learning.

>>> from auglocal_fx import to_local
>>> local = to_local("timm:regnetx_004", d=6, input_size=(3, 64, 64))

``__all__`` is the promised API: the entry points a user needs. Everything else is importable
from its module (``auglocal_fx.planning.pyramid_depths``, ``auglocal_fx.specs.ModelSpec``,
``auglocal_fx.cka.BlockCKA``, ...); ``resolve_model`` is also importable from here, as
older code does.
"""

from .budget import solve_budget
from .cka import block_cka
from .costs import cost_report
from .errors import AugLocalError
from .flops import count_flops
from .local import LocalNet, load, to_local
from .memory import measure_memory
from .options import ConversionOptions
from .probes import linear_probe
from .specs import resolve_model  # noqa: F401 - importable here, not promised (see auglocal_fx.specs)
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
