"""``to_local`` and ``load``: a model (or spec) converted into a ``LocalNet``, or read back.

``to_local`` traces the model, cuts it into blocks, plans and synthesizes the auxiliary networks
with the chosen rule and returns the ``LocalNet`` (``auglocal_fx.local_net``), which this module
re-exports so ``from auglocal_fx.local import LocalNet`` keeps working.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._threads import old_objects_frozen, single_thread
from .checkpoints import LOCALNET, read
from .errors import AugLocalError, first_line
from .initialization import InitReference
from .local_net import CHECKPOINT_FORMAT, LocalNet
from .options import ConversionOptions, conversion_options
from .partition import Partition, partition_blocks
from .planning import match_arity
from .specs import missing_input_size, model_input_size, resolve_model, spec_file
from .rules import RuleContext, get_rule
from .rules.base import Normalization
from .synthesis import CopyTemplates, choose_aux_head, warn_adapters
from .tracing import SHAPE_KEY, trace_model

__all__ = ["LocalNet", "to_local", "load", "CHECKPOINT_FORMAT"]


def to_local(
    model: Union[nn.Module, str],
    d: Optional[int] = None,
    tau: Optional[float] = None,
    pyramid: Optional[bool] = None,
    selection: Optional[str] = None,
    input_size: Optional[Sequence[int]] = None,
    num_classes: Optional[int] = None,
    leaf_modules: Sequence[Union[type, str]] = (),
    autowrap_functions: Sequence[Callable] = (),
    block_boundaries: Optional[Sequence[str]] = None,
    weights: Optional[str] = None,
    aux_head: Optional[str] = None,
    rule: Optional[str] = None,
    normalization: Optional[Normalization] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    aux_init: Optional[str] = None,
    aux_checkpoint: Optional[bool] = None,
    options: Optional[ConversionOptions] = None,
    aux_resolution: Optional[str] = None,
    shared_parameters: Optional[str] = None,
) -> LocalNet:
    """Convert a ConvNet into an AugLocal :class:`LocalNet`.

    The conversion options are a :class:`~auglocal_fx.ConversionOptions` (``options=``); the
    keyword arguments of the same names are a convenience that overrides its fields (``None``
    keeps them: ``d=2``, ``tau=0.5``, ``pyramid=True``, ``selection="uniform"``,
    ``aux_head="auto"``, ``rule="auglocal"``, ``aux_init="init"``, ``aux_checkpoint=False``,
    ``aux_resolution="paper"``, ``shared_parameters="sum"``).

    Args:
        model: an ``nn.Module`` (shared, not copied: training the LocalNet trains it), or a
            spec string such as ``"timm:regnetx_004"`` (see :func:`~auglocal_fx.resolve_model`).
        d: the paper's auxiliary depth: sampled blocks + classifier (>= 2).
        tau: pyramid decay in ``[0, 1]``: deeper blocks get shallower auxiliary networks.
        pyramid: ``False`` gives every auxiliary network depth ``d``.
        selection: ``"uniform"`` (AugLocal), ``"sequential"`` or ``"repetitive"``.
        input_size: ``(C, H, W)`` to trace at; default the size the model states (timm's
            ``pretrained_cfg``, or an ``input_size`` attribute); a model that states none needs it
            (a spec string brings its own default).
        num_classes: for a spec string, the classifier width (a model object has its own).
        leaf_modules: module classes or names to keep whole (no block boundary inside).
        autowrap_functions: functions to record as single calls when tracing.
        block_boundaries: module names whose outputs end a block, replacing the automatic cut.
        weights: for a spec string, a local weights file to load before conversion: a
            ``state_dict`` or a timm / torchvision training checkpoint (see
            :func:`~auglocal_fx.specs.load_weights`; a classifier with another number of
            classes is left out, with a warning). Load weights into a model object yourself.
        aux_head: the auxiliary networks' head: ``"copy"`` (a fresh copy of the network's own
            head, the method's choice), ``"slim"`` (the authors' 512-wide MLP head for VGG on
            ImageNet) or ``"auto"``: slim where the head holds at least half of the network's
            parameters (VGG's classifier, timm's ``pre_logits``), copy otherwise.
        rule: the local learning rule: ``"auglocal"``, or the paper's comparison systems
            ``"dgl"``, ``"predsim"``, ``"infopro"``, or ``"auglocal+infopro"`` (see
            :mod:`auglocal_fx.rules`). The baselines train every block but the last locally
            and ignore ``d``, ``tau``, ``pyramid``, ``selection``, ``aux_head`` and ``aux_init``.
        normalization: the per-channel ``(mean, std)`` the training images are normalised
            with (the trainer passes its dataset's; saved with the network). InfoPro's
            reconstruction target undoes it, as the authors' code does; without it, each image
            is rescaled to ``[0, 1]`` by its own minimum and maximum instead.
        model_kwargs: for a spec string, keyword arguments for its builder, e.g.
            ``{"patch_size": 4, "img_size": 32, "depth": 6}`` for ``timm.create_model`` (saved
            with the spec, so :func:`load` re-creates the same model).
        aux_init: how AugLocal's block and head copies start: ``"init"`` (drawn afresh by the
            source model's init rule, as the paper does) or ``"copy"`` (the source block's
            current weights where the adaptation kept the shape, the init rule elsewhere; see
            :mod:`auglocal_fx.synthesis`). ``"init"`` is the default: fine-tuning a BP-pretrained
            ResNet-32 either way gave the same primary accuracy (README, "Fine-tuning"), and
            only the auxiliary networks were better with ``"copy"``.
        aux_checkpoint: recompute activations in backward so that a local module holds one
            piece's at a time: every primary block (in the output module, each of its blocks) is
            recomputed on its own (:func:`torch.utils.checkpoint.checkpoint`, non-reentrant)
            when its backward comes, after its auxiliary network's (or the head's), which keeps
            its activations. The name is from when the auxiliary networks were recomputed: that
            lowered no peak, since their backward runs first, while the block's activations are
            held. The gradients, dropout masks and BatchNorm statistics are exactly those
            without it; the cost is one more forward of the primary network per step. Settable
            later as ``local.aux_checkpoint``.
        aux_resolution: where AugLocal's copies run: ``"paper"`` (the planned strides, at most
            one 2x reduction per copy, as the authors' code) or ``"source"`` (each copy's input
            average-pooled to its source block's resolution first; see
            :mod:`auglocal_fx.synthesis`).
        shared_parameters: a parameter used by several blocks, or by blocks and the head (a
            module called in several places, as CoaT's position encodings): ``"sum"`` keeps the
            blocks apart, and each user's local loss adds to the parameter's gradient (the sum
            over its users, as backprop sums over uses; it is stepped once, after its last
            user); ``"merge"`` merges the blocks from its first use to its last (a block sharing
            one with the head joins the head), so that one loss trains it.
        options: the conversion options as one record; ``leaf_modules``,
            ``autowrap_functions`` and ``weights`` are not in it (a checkpoint cannot carry
            classes and functions; the weights are the checkpoint's own).

    Raises:
        AugLocalError: bad options, unknown model, untraceable model, no classifier head, an
            input too small for the network, or a depth that leaves nothing to train locally.
    """
    opts = conversion_options(
        options, d=d, tau=tau, pyramid=pyramid, selection=selection, input_size=input_size,
        num_classes=num_classes, block_boundaries=block_boundaries, aux_head=aux_head, rule=rule,
        normalization=normalization, model_kwargs=model_kwargs, aux_init=aux_init,
        aux_checkpoint=aux_checkpoint, aux_resolution=aux_resolution, shared_parameters=shared_parameters)
    local_rule = get_rule(opts.rule)
    input_size, num_classes, model_kwargs = opts.input_size, opts.num_classes, opts.model_kwargs
    spec = None
    initial = None
    if isinstance(model, str):
        resolved = resolve_model(model, num_classes=num_classes, input_size=input_size,
                                 weights=weights, model_kwargs=model_kwargs)
        spec = resolved.spec
        model, size = resolved.model, resolved.input_size
        initial = resolved.initial_parameters
        model_kwargs = resolved.model_kwargs
    elif isinstance(model, nn.Module):
        given = [name for name, value in (("num_classes", num_classes), ("weights", weights),
                                          ("model_kwargs", model_kwargs)) if value is not None]
        if given:
            raise AugLocalError(
                f"{' and '.join(given)} apply to spec strings only: a model object already has its "
                "classifier and weights (load them into it before to_local), or pass a spec like "
                "'timm:resnet18'")
        size = tuple(input_size) if input_size is not None else model_input_size(model)
        if size is None:
            raise missing_input_size(f"the {type(model).__name__} model")
    else:
        raise AugLocalError(
            f"to_local() takes an nn.Module or a spec string like 'timm:resnet18', not "
            f"{type(model).__name__}"
        )
    with single_thread(), old_objects_frozen():
        traced = trace_model(model, size, leaf_modules, autowrap_functions)
        # The normalization's channel count is checked against the traced input here.
        opts = opts.replace(input_size=tuple(int(v) for v in traced.input_size),
                            num_classes=_output_classes(traced), model_kwargs=model_kwargs)
        partition = partition_blocks(traced, opts.block_boundaries, opts.shared_parameters)
        plans = local_rule.plan(partition.resolutions, opts.d, opts.tau, opts.pyramid, opts.selection)
        plans = _tuple_plans(partition, plans, local_rule, opts)
        opts = opts.replace(resolved_aux_head=choose_aux_head(partition, opts.aux_head))
        init = InitReference.from_model(model, initial)
        notes: List[Tuple[str, str, str]] = []
        # The copy templates live as long as this conversion: another conversion shares nothing.
        context = RuleContext(partition, opts.num_classes, opts.input_size, len(plans) + 1, init,
                              opts.resolved_aux_head, notes, opts.aux_init, opts.aux_resolution,
                              CopyTemplates())
        aux = [local_rule.build(p, context) for p in plans]
    warn_adapters(notes)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    local = LocalNet(model, partition, aux, plans, opts, spec)
    return local.to(device)


def _tuple_plans(partition: Partition, plans, local_rule, opts: ConversionOptions):
    """The plans where boundaries carry tuples: copies only of blocks of the arity that reaches them."""
    arities = [partition.output_arity(j) for j in range(len(partition.blocks))]
    if max(arities) == 1:
        return plans
    first = next(j for j, a in enumerate(arities) if a > 1)
    where = f"block {first} ({', '.join(partition.block_names[first][:3])}) returns {arities[first]} tensors"
    if not local_rule.takes_tuples:
        raise AugLocalError(
            f"rule {local_rule.name!r} cannot train a network whose block boundaries carry several "
            f"tensors ({where}); use rule 'auglocal', or give block_boundaries= that end on one tensor"
        )
    if opts.aux_follow is not None or opts.aux_tie:
        raise AugLocalError(
            f"aux_follow and aux_tie need each copy to mirror one block, and {where}; convert "
            "without them, or give block_boundaries= that end on one tensor"
        )
    return [match_arity(p, arities, partition.resolutions) for p in plans]


def _output_classes(traced) -> int:
    output = next(n for n in traced.eval_graph.graph.nodes if n.op == "output")
    return int(output.args[0].meta[SHAPE_KEY][1])


def load(path: Union[str, os.PathLike], model: Optional[nn.Module] = None,
         map_location: Union[str, torch.device] = "cpu") -> LocalNet:
    """Restore a ``LocalNet`` written by ``LocalNet.save``.

    Args:
        path: the checkpoint file.
        model: a fresh model of the same architecture: needed when the LocalNet was made from
            a model object rather than a spec string; given, it is used instead of the spec.
        map_location: where to load the tensors.

    Raises:
        AugLocalError: missing, corrupt or foreign file, or weights that do not fit.
    """
    path = os.fspath(path)
    payload = read(path, LOCALNET, map_location)
    try:
        options = ConversionOptions.from_dict(payload["options"])
    except AugLocalError as exc:
        raise AugLocalError(f"{path!r} holds options this version cannot read: {exc}") from None
    spec = payload.get("spec") if model is None else None
    source: Union[nn.Module, str, None] = spec if spec else model
    if source is None:
        raise AugLocalError(
            f"{path!r} was saved from a model object, not a spec: pass load(path, model=...)"
        )
    file = spec_file(spec) if spec else None
    if file is not None and not os.path.isfile(file):
        raise AugLocalError(
            f"{path!r} was converted from {spec!r}, and {file} no longer exists: put the file "
            "back, or pass load(path, model=...) with a fresh model of that architecture"
        )
    if not spec:  # a model object brings its own classifier and builder arguments
        options = options.replace(num_classes=None, model_kwargs=None)
    local = to_local(source, options=options.replace(resolved_aux_head=None))
    try:
        local.load_state_dict(payload["state_dict"], strict=True)
    except Exception as exc:
        raise AugLocalError(
            f"the weights in {path!r} do not fit the rebuilt network "
            f"({first_line(exc)}); was it saved with another auglocal-fx version?"
        ) from exc
    return local
