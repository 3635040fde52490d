"""auglocal-fx: turn any PyTorch ConvNet into a network trained by AugLocal local learning."""

from .errors import AugLocalError
from .planning import AuxPlan, plan_aux_nets, pyramid_depths, uniform_selection

__version__ = "0.1.0"

__all__ = [
    "AugLocalError",
    "AuxPlan",
    "plan_aux_nets",
    "pyramid_depths",
    "uniform_selection",
    "__version__",
]
