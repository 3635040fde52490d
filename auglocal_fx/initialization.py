"""Initialise auxiliary copies the way the source model initialises the layers they copy.

The rule (docs/method.md, "Initialisation"): each parameter of a copy is drawn from the
distribution of the parameter it copies *as the source model initialised it*:

* a constant stays that constant: BatchNorm weight 1 and bias 0, a zero-initialised last
  BatchNorm weight of a residual block (timm's ``zero_init_last``), zero biases;
* otherwise the same family (normal or uniform, told apart by the sample kurtosis) with the same
  mean and standard deviation (the fan rule's exact value, below, when the source's sample
  standard deviation agrees with it up to sampling noise);
* where adaptation changed the layer's shape, the standard deviation follows the fan rule that
  the source model's layers of that type obey (``std * sqrt(fan_in)`` or ``std * sqrt(fan_out)``
  constant across them, or a fixed ``std``), fitted over all of them; layers a copy adds
  (projection shortcuts, input adapters) take their type's rule the same way.

On the paper's CIFAR ResNets this reproduces the authors' code: He fan-out normal convolutions
(``std = sqrt(2 / (k * k * out_channels))``), BatchNorm weight 1 and bias 0, and PyTorch's own
initialisation for linear classifiers. Without a rule (a type the source model does not have)
a layer keeps PyTorch's default initialisation.

The statistics are those of the source model's parameters *at initialisation*: the model's
own values when it is converted as created, or the values it was created with when a weights
file was loaded into it (``resolve_model`` keeps them).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import nn

__all__ = ["TensorInit", "FanRule", "InitReference", "describe_init", "fit_fan_rule"]

# Excess kurtosis: normal 0, truncated normal at 2 sigma -0.64, uniform -1.2.
_UNIFORM_KURTOSIS = -0.9


@dataclass(frozen=True)
class TensorInit:
    """How one tensor was initialised.

    Attributes:
        family: ``"constant"``, ``"normal"`` or ``"uniform"``.
        mean: the constant, or the distribution's mean.
        std: the standard deviation (0 for a constant).
    """

    family: str
    mean: float
    std: float

    def sample_(self, tensor: torch.Tensor, std: Optional[float] = None) -> torch.Tensor:
        """Fill ``tensor`` in place from this distribution (optionally with another ``std``)."""
        std = self.std if std is None else std
        with torch.no_grad():
            if self.family == "constant":
                return tensor.fill_(self.mean)
            if self.family == "uniform":
                half = math.sqrt(3.0) * std
                return tensor.uniform_(self.mean - half, self.mean + half)
            return tensor.normal_(self.mean, std)


@dataclass(frozen=True)
class FanRule:
    """``std = scale / sqrt(fan)`` for ``mode`` ``"fan_in"`` / ``"fan_out"``, or ``std = scale``.

    Attributes:
        mode: ``"fan_in"``, ``"fan_out"`` or ``"fixed"``.
        scale: the fitted constant.
        family: the distribution family of the tensors it was fitted on.
    """

    mode: str
    scale: float
    family: str

    def std(self, fan_in: int, fan_out: int) -> float:
        """The standard deviation this rule gives a tensor with these fans."""
        if self.mode == "fan_in":
            return self.scale / math.sqrt(max(1, fan_in))
        if self.mode == "fan_out":
            return self.scale / math.sqrt(max(1, fan_out))
        return self.scale


def describe_init(tensor: torch.Tensor) -> TensorInit:
    """Constant, or normal/uniform with the sample mean and standard deviation."""
    flat = tensor.detach().reshape(-1).double().cpu()
    if flat.numel() == 0 or bool((flat == flat[0]).all()):
        return TensorInit("constant", float(flat[0]) if flat.numel() else 0.0, 0.0)
    mean = float(flat.mean())
    std = float(flat.std(unbiased=False))
    if std == 0.0 or flat.numel() < 8:
        return TensorInit("normal", mean, std)
    kurtosis = float(((flat - mean) ** 4).mean()) / std ** 4 - 3.0
    return TensorInit("uniform" if kurtosis < _UNIFORM_KURTOSIS else "normal", mean, std)


def fans(weight_shape: Tuple[int, ...]) -> Tuple[int, int]:
    """PyTorch's fan-in and fan-out of a weight of this shape (``out, in, *kernel``)."""
    if len(weight_shape) < 2:
        n = int(weight_shape[0]) if weight_shape else 1
        return n, n
    receptive = math.prod(int(v) for v in weight_shape[2:])
    return int(weight_shape[1]) * receptive, int(weight_shape[0]) * receptive


def fit_fan_rule(samples: Iterable[Tuple[float, int, int, str]]) -> Optional[FanRule]:
    """Fit the fan rule that ``(std, fan_in, fan_out, family)`` samples follow best.

    Each candidate (``std`` fixed, ``std * sqrt(fan_in)`` fixed, ``std * sqrt(fan_out)``
    fixed) gives one constant per sample; the candidate whose constants vary least (relative
    spread) wins. Ties, e.g. when every sample has the same fans, go to ``fan_in``, PyTorch's
    and Kaiming's default mode.

    Returns:
        The rule, or ``None`` without samples.
    """
    samples = list(samples)
    if not samples:
        return None
    candidates = {
        "fan_in": [s * math.sqrt(fi) for s, fi, _, _ in samples],
        "fan_out": [s * math.sqrt(fo) for s, _, fo, _ in samples],
        "fixed": [s for s, _, _, _ in samples],
    }

    def spread(values):
        mid = statistics.median(values)
        return (max(values) - min(values)) / mid if mid > 0 else math.inf

    # Dictionary order makes fan_in win ties.
    mode = min(candidates, key=lambda m: spread(candidates[m]) - 1e-9 * (m == "fan_in"))
    families = [f for _, _, _, f in samples]
    family = max(set(families), key=families.count)
    return FanRule(mode, statistics.median(candidates[mode]), family)


def _owner_fans(module: nn.Module) -> Optional[Tuple[int, int]]:
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
        return fans(tuple(weight.shape))
    return None


class InitReference:
    """Initial-value statistics of a source model, for initialising copies of its layers.

    Attributes:
        by_param: per parameter object of the source model (by ``id``), its ``TensorInit``.
        rules: per ``(module class, parameter name)``, the ``FanRule`` its tensors follow.
    """

    def __init__(self, by_param: Dict[int, TensorInit], rules: Dict[Tuple[type, str], FanRule]):
        self.by_param = by_param
        self.rules = rules

    @classmethod
    def from_model(cls, model: nn.Module,
                   initial: Optional[Mapping[str, torch.Tensor]] = None) -> "InitReference":
        """Statistics of ``model``'s parameters at initialisation.

        Args:
            model: the model whose parameter objects the copies' sources are.
            initial: the parameters' initial values by name, when ``model`` holds loaded
                weights (default: ``model``'s current values are the initial ones).
        """
        initial = initial or {}
        by_param: Dict[int, TensorInit] = {}
        samples: Dict[Tuple[type, str], list] = {}
        for prefix, module in model.named_modules():
            owner = _owner_fans(module)
            for name, param in module.named_parameters(recurse=False):
                if id(param) in by_param:
                    continue  # shared parameters are described once
                value = initial.get(f"{prefix}.{name}" if prefix else name)
                if value is None or value.shape != param.shape:
                    value = param
                init = describe_init(value)
                by_param[id(param)] = init
                if init.family == "constant" or init.std <= 0.0:
                    continue
                fan_in, fan_out = fans(tuple(value.shape)) if value.dim() >= 2 else (owner or (0, 0))
                if fan_in and fan_out:
                    samples.setdefault((type(module), name), []).append(
                        (init.std, fan_in, fan_out, init.family))
        rules = {key: rule for key, s in samples.items() if (rule := fit_fan_rule(s)) is not None}
        return cls(by_param, rules)

    def initialise_(self, module: nn.Module, sources: Mapping[str, nn.Parameter]) -> None:
        """Initialise ``module``'s own parameters in place.

        Args:
            module: a module of a copy (only its direct parameters are touched).
            sources: for each of its parameter names, the source model's parameter it copies
                (missing for layers the copy adds).
        """
        owner = _owner_fans(module)
        for name, param in module.named_parameters(recurse=False):
            source = sources.get(name)
            init = self.by_param.get(id(source)) if source is not None else None
            if init is not None and init.family == "constant":
                init.sample_(param)
                continue
            rule = self.rules.get((type(module), name))
            fan_in, fan_out = fans(tuple(param.shape)) if param.dim() >= 2 else (owner or (1, 1))
            if init is not None and source.shape == param.shape:
                std = init.std
                if rule is not None and _explains(rule.std(fan_in, fan_out), init.std, param.numel()):
                    # The source's sample std is the rule's value up to sampling noise: draw
                    # with the rule's exact value instead of adding that noise again.
                    std = rule.std(fan_in, fan_out)
                init.sample_(param, std=std)
            elif rule is not None:
                family = init if init is not None else TensorInit(rule.family, 0.0, 0.0)
                family.sample_(param, std=rule.std(fan_in, fan_out))
            # else: keep the default initialisation the module was created with


def _explains(predicted: float, observed: float, count: int) -> bool:
    """Whether ``observed``, a sample std of ``count`` values, fits ``predicted`` (3 std errors)."""
    return predicted > 0 and abs(observed / predicted - 1) <= 3.0 / math.sqrt(2.0 * max(1, count))
