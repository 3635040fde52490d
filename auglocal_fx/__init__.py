"""auglocal-fx: turn any PyTorch ConvNet into a network trained by AugLocal local learning.

>>> from auglocal_fx import to_local
>>> local = to_local("timm:regnetx_004", d=6, input_size=(3, 64, 64))
"""

from .analysis import BlockCKA, Probe, block_cka, linear_probe
from .errors import AugLocalError
from .flops import count_flops, solve_budget
from .local import LocalNet, load, to_local
from .memory import measure_memory
from .options import ConversionOptions
from .planning import AuxPlan, plan_aux_nets, pyramid_depths, uniform_selection
from .specs import ModelSpec, resolve_model

__version__ = "0.1.0"

__all__ = [
    "AugLocalError",
    "AuxPlan",
    "ConversionOptions",
    "BlockCKA",
    "Probe",
    "block_cka",
    "linear_probe",
    "count_flops",
    "solve_budget",
    "LocalNet",
    "ModelSpec",
    "load",
    "measure_memory",
    "plan_aux_nets",
    "pyramid_depths",
    "resolve_model",
    "to_local",
    "uniform_selection",
    "__version__",
]
