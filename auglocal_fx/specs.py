"""Model specs: ``timm:NAME``, ``torchvision:NAME``, ``paper:NAME`` and ``path/file.py:factory``.

A spec names an architecture; ``resolve_model`` creates it with random weights (nothing is
ever downloaded), with the builder's keyword arguments (``model_kwargs``, as timm's
``--model-kwargs``), optionally loads a local weights file, and knows the default input size.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .checkpoints import load_weights
from .errors import AugLocalError, first_line
from .models import PAPER_MODELS

__all__ = ["ModelSpec", "resolve_model", "load_weights", "parse_model_kwargs", "PREFIXES"]

PREFIXES = ("timm", "torchvision", "paper")


@dataclass
class ModelSpec:
    """A resolved spec: the created model and what is needed to create it again.

    Attributes:
        spec: the spec string, e.g. ``"timm:regnetx_004"`` (a file's path made absolute).
        model: the model created from it (random weights, or the given weights file).
        input_size: ``(C, H, W)`` the model is converted at.
        num_classes: classifier width.
        initial_parameters: the parameters the model was created with, by name, when a
            weights file replaced them (``None`` otherwise); auxiliary copies are initialised
            from their statistics.
        model_kwargs: the builder's keyword arguments the model was created with.
    """

    spec: str
    model: nn.Module
    input_size: Tuple[int, int, int]
    num_classes: int
    _factory: Callable[[], nn.Module]
    initial_parameters: Optional[Dict[str, torch.Tensor]] = None
    model_kwargs: Optional[Dict[str, Any]] = None

    @property
    def name(self) -> str:
        """A short name for files and tables (``regnetx_004`` for ``timm:regnetx_004``)."""
        tail = self.spec.rsplit(":", 1)[-1]
        return os.path.splitext(os.path.basename(tail))[0] or "model"

    def create(self) -> nn.Module:
        """A fresh model of the same architecture (random weights)."""
        return self._factory()


def _check_input_size(input_size: Optional[Sequence[int]]) -> Optional[Tuple[int, int, int]]:
    if input_size is None:
        return None
    size = tuple(int(v) for v in input_size)
    if len(size) != 3 or min(size) < 1:
        raise AugLocalError(
            f"input size {tuple(input_size)} is invalid: give three positive integers C H W, "
            "e.g. 3 224 224"
        )
    return size  # type: ignore[return-value]


def _timm_factory(name: str, num_classes: Optional[int],
                  input_size: Optional[Tuple[int, int, int]], model_kwargs: Mapping[str, Any]):
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        hint = f" Close names: {', '.join(close)}." if close else " See timm.list_models()."
        raise AugLocalError(f"unknown timm model {name!r}.{hint}")
    kwargs: Dict[str, object] = dict(model_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    default = timm.get_pretrained_cfg_value(name, "input_size")
    if input_size is not None and default is not None and "img_size" not in kwargs \
            and tuple(input_size[1:]) != tuple(default[1:]):
        # Transformers size their position embeddings and windows for one input size: build
        # the model for the size asked (ConvNets do not take img_size and need nothing).
        try:
            timm.create_model(name, pretrained=False, img_size=tuple(input_size[1:]), **kwargs)
        except TypeError:
            pass
        else:
            kwargs["img_size"] = tuple(input_size[1:])

    def factory() -> nn.Module:
        return timm.create_model(name, pretrained=False, **kwargs)

    return factory


def model_input_size(model: nn.Module) -> Optional[Tuple[int, int, int]]:
    """The input size a model states: timm's ``pretrained_cfg["input_size"]`` (or
    ``default_cfg``), else an ``input_size`` attribute of three integers; ``None`` if neither."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            return tuple(int(v) for v in cfg["input_size"])  # type: ignore[return-value]
    size = getattr(model, "input_size", None)
    if isinstance(size, (tuple, list)) and len(size) == 3 and all(isinstance(v, int) for v in size):
        return tuple(size)  # type: ignore[return-value]
    return None


def missing_input_size(what: str) -> AugLocalError:
    """The error for a model that does not state its input size."""
    return AugLocalError(
        f"{what} does not say its input size: pass input_size=(C, H, W) (--input-size C H W), "
        "e.g. (3, 32, 32) for a CIFAR network or (3, 224, 224) for an ImageNet one"
    )


def _torchvision_factory(name: str, num_classes: Optional[int], model_kwargs: Mapping[str, Any]):
    import torchvision

    available = set(torchvision.models.list_models(module=torchvision.models))
    if name not in available:
        close = sorted(n for n in available if name.split("_")[0] in n)[:5]
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise AugLocalError(
            f"unknown torchvision classification model {name!r}.{hint} "
            "See torchvision.models.list_models(module=torchvision.models)."
        )

    def factory() -> nn.Module:
        kwargs: Dict[str, Any] = {**model_kwargs, "weights": None}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if name in ("googlenet", "inception_v3"):
            # Their default re-initialisation with scipy's truncnorm is slow and irrelevant here.
            kwargs["init_weights"] = True
        return torchvision.models.get_model(name, **kwargs)

    return factory


def _paper_factory(name: str, num_classes: Optional[int], model_kwargs: Mapping[str, Any]):

    if name not in PAPER_MODELS:
        raise AugLocalError(
            f"unknown paper model {name!r}: choose one of {', '.join(sorted(PAPER_MODELS))}"
        )
    build = PAPER_MODELS[name]
    return lambda: build(num_classes=10 if num_classes is None else num_classes, **model_kwargs)


def _file_factory(path: str, factory_name: str, num_classes: Optional[int],
                  model_kwargs: Mapping[str, Any]):
    if not os.path.isfile(path):
        raise AugLocalError(f"model file {path!r} does not exist: give path/to/file.py:factory")
    module_name = f"_auglocal_user_{abs(hash(os.path.abspath(path)))}"
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise AugLocalError(f"cannot import {path!r} as Python: give a .py file")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # the user's file: report, don't crash
            raise AugLocalError(f"importing {path!r} failed: {type(exc).__name__}: {exc}") from exc
        sys.modules[module_name] = module
    fn = getattr(module, factory_name, None)
    if not callable(fn):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise AugLocalError(
            f"{path!r} has no callable {factory_name!r}: define a function that returns an "
            f"nn.Module (callables found: {', '.join(names[:8]) or 'none'})"
        )
    takes_classes = "num_classes" in inspect.signature(fn).parameters

    def factory() -> nn.Module:
        classes = {"num_classes": num_classes} if (takes_classes and num_classes) else {}
        model = fn(**model_kwargs, **classes)
        if not isinstance(model, nn.Module):
            raise AugLocalError(
                f"{path}:{factory_name} returned {type(model).__name__}, not an nn.Module"
            )
        return model

    return factory


def spec_file(spec: str) -> Optional[str]:
    """The Python file a ``path/to/file.py:factory`` spec names, else ``None``."""
    prefix, _ = _split_spec(spec)
    return prefix if prefix.endswith(".py") else None


def _split_spec(spec: str) -> Tuple[str, str]:
    if ":" not in spec:
        raise AugLocalError(
            f"model spec {spec!r} has no prefix: use timm:NAME, torchvision:NAME, paper:NAME "
            "or path/to/file.py:factory"
        )
    # A file path may itself contain ':'; the factory name never does.
    prefix, name = spec.rsplit(":", 1) if ".py:" in spec else spec.split(":", 1)
    if not name:
        raise AugLocalError(f"model spec {spec!r} names no model after {prefix!r}:")
    return prefix, name


def _infer_num_classes(model: nn.Module, input_size: Tuple[int, int, int]) -> int:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *input_size))
    except Exception as exc:
        raise AugLocalError(
            f"the model fails on an input of size {input_size}: {type(exc).__name__}: "
            f"{first_line(exc, '')}; check --input-size"
        ) from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise AugLocalError(
            "no classifier head: the model's output is not a (N, num_classes) tensor; "
            "auglocal-fx needs a classification network"
        )
    return int(out.shape[1])


def resolve_model(
    spec: str,
    num_classes: Optional[int] = None,
    input_size: Optional[Sequence[int]] = None,
    weights: Optional[str] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
) -> ModelSpec:
    """Create the model a spec names, with random weights or a local weights file.

    Args:
        spec: ``timm:NAME``, ``torchvision:NAME``, ``paper:resnet32|resnet110|vgg19`` or
            ``path/to/file.py:factory`` (a function returning an ``nn.Module``; it gets
            ``num_classes=`` when it accepts it).
        num_classes: classifier width; default: the architecture's own (1000 for ImageNet
            models, 10 for the paper's CIFAR networks).
        input_size: ``(C, H, W)``; default: the size the model states (timm's pretrained
            config, the paper's networks' 32x32; a timm ``img_size`` in ``model_kwargs``), 224
            for torchvision; a file's model that states none needs it.
        weights: a local weights file (see ``load_weights``; never downloaded).
        model_kwargs: keyword arguments for the builder (``timm.create_model``, torchvision's
            ``get_model``, the file's factory), e.g. ``{"depth": 6, "patch_size": 4}``.

    Raises:
        AugLocalError: unknown prefix or model, missing file or factory, a ``model_kwargs`` key
            the builder does not take, unreadable or unfitting weights, a model that does not
            state its input size when none is given.
    """
    if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1):
        raise AugLocalError(f"num_classes={num_classes!r} is invalid: give a positive integer")
    size = _check_input_size(input_size)
    kwargs = _check_model_kwargs(model_kwargs)
    prefix, name = _split_spec(spec)
    if prefix == "timm":
        factory = _timm_factory(name, num_classes, size, kwargs)
    elif prefix == "torchvision":
        factory = _torchvision_factory(name, num_classes, kwargs)
    elif prefix == "paper":
        factory = _paper_factory(name, num_classes, kwargs)
    elif prefix.endswith(".py"):
        factory = _file_factory(prefix, name, num_classes, kwargs)
        spec = f"{os.path.abspath(prefix)}:{name}"  # checkpoints must find it from anywhere
    else:
        raise AugLocalError(
            f"unknown spec prefix {prefix!r} in {spec!r}: use timm:, torchvision:, paper: or "
            "path/to/file.py:factory"
        )
    model = _create(factory, spec, kwargs)
    if size is None and prefix == "timm" and "img_size" in kwargs:
        # timm keeps the registered input size in pretrained_cfg whatever img_size was given.
        side = kwargs["img_size"]
        hw = tuple(side) if isinstance(side, (tuple, list)) else (side, side)
        size = _check_input_size((kwargs.get("in_chans", 3), *hw))
    if size is None:
        size = model_input_size(model)
    if size is None:
        if prefix != "torchvision":
            raise missing_input_size(f"the model of {spec!r}")
        size = (3, 224, 224)  # torchvision's classification models are ImageNet models
    initial = None
    classes = num_classes if num_classes is not None else _infer_num_classes(model, size)
    if weights is not None:
        initial = {k: v.detach().clone() for k, v in model.named_parameters()}
        load_weights(model, weights, num_classes=int(classes))
    return ModelSpec(spec=spec, model=model, input_size=size, num_classes=int(classes),
                     _factory=factory, initial_parameters=initial,
                     model_kwargs=dict(kwargs) or None)


# Builder arguments that have an option of their own, or would download weights.
_RESERVED_KWARGS = {
    "num_classes": "give num_classes= (--num-classes) instead",
    "pretrained": "nothing is downloaded: give a local file with weights= (--weights FILE)",
    "weights": "nothing is downloaded: give a local file with weights= (--weights FILE)",
    "pretrained_cfg_overlay": "nothing is downloaded: give a local file with weights= (--weights FILE)",
}


def _check_model_kwargs(model_kwargs: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, Mapping) or not all(
            isinstance(k, str) and k.isidentifier() for k in model_kwargs):
        raise AugLocalError(f"model_kwargs={model_kwargs!r} is invalid: give a dict of keyword "
                            "arguments, e.g. {'depth': 6}")
    for key in model_kwargs:
        if key in _RESERVED_KWARGS:
            raise AugLocalError(f"model_kwargs cannot set {key!r}: {_RESERVED_KWARGS[key]}")
    return dict(model_kwargs)


def _create(factory: Callable[[], nn.Module], spec: str, model_kwargs: Mapping[str, Any]) -> nn.Module:
    """``factory()``, with a builder's refusal of ``model_kwargs`` as one line of ours."""
    if not model_kwargs:
        return factory()
    try:
        return factory()
    except AugLocalError:
        raise
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        given = ", ".join(f"{k}={v!r}" for k, v in model_kwargs.items())
        raise AugLocalError(
            f"{spec} cannot be built with model_kwargs {given}: {type(exc).__name__}: "
            f"{first_line(exc)}; check the names and values the builder takes"
        ) from exc


def parse_model_kwargs(pairs: Sequence[str]) -> Dict[str, Any]:
    """``["depth=6", "img_size=32", "global_pool=avg"]`` -> ``{"depth": 6, ...}``.

    As timm's ``train.py --model-kwargs``: each value is a Python literal where it parses as
    one (ints, floats, booleans, ``None``, tuples, lists), else the string as written.

    Raises:
        AugLocalError: a pair without ``=`` or with a key that is not a Python name.
    """
    kwargs: Dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise AugLocalError(f"model kwarg {pair!r} is not KEY=VALUE: write e.g. depth=6 "
                                "patch_size=4 img_size=32")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            kwargs[key] = text  # a bare word (global_pool=avg) needs no quotes on a command line
    return kwargs
