"""``ConversionOptions``: what ``to_local`` is asked to build, in one record.

One frozen, typed dataclass validates the options, says them in words (``describe``), and
writes / reads the ``options`` dict of a checkpoint (old checkpoints, missing newer keys, load
with the defaults those keys had before they existed). ``to_local``, ``LocalNet``, ``TrainConfig``,
``cost_report``, ``solve_budget``, ``measure_memory`` and the CLI take it; their keyword
arguments are a convenience that builds one.

``leaf_modules`` and ``autowrap_functions`` are not options here: they hold classes and
functions a checkpoint cannot carry, so they stay arguments of tracing (``to_local``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from .errors import AugLocalError
from .following import validate_follow, validate_freeze
from .graph_blocks import validate_shared_parameters
from .planning import validate_options
from .rules import get_rule
from .synthesis import validate_aux_head, validate_aux_init, validate_aux_resolution

__all__ = ["ConversionOptions", "conversion_options"]

# The keys a checkpoint's ``options`` dict may miss (written before the option existed), and
# what those checkpoints meant.
_OLD_DEFAULTS = {"aux_head": "copy", "rule": "auglocal", "normalization": None, "aux_init": "init",
                 "model_kwargs": None, "aux_checkpoint": False, "block_boundaries": None,
                 "aux_follow": None, "aux_follow_adapted": "own", "aux_freeze": None,
                 "aux_tie": False, "aux_resolution": "paper", "shared_parameters": "merge"}


@dataclass(frozen=True)
class ConversionOptions:
    """The conversion options of an AugLocal network (see ``to_local``).

    Attributes:
        d: auxiliary depth, sampled blocks + classifier (>= 2).
        tau: pyramid decay in ``[0, 1]``.
        pyramid: ``False`` gives every auxiliary network depth ``d``.
        selection: ``"uniform"``, ``"sequential"`` or ``"repetitive"``.
        aux_head: ``"auto"``, ``"copy"`` or ``"slim"``, as asked.
        rule: a registered local learning rule (``auglocal_fx.rules``).
        aux_init: ``"init"`` or ``"copy"``: how AugLocal's copies start.
        aux_checkpoint: recompute the primary blocks in backward, each on its own, so a local
            module holds one piece's activations at a time (see ``to_local``).
        input_size: ``(C, H, W)`` to trace at; ``None``: the model's own.
        num_classes: classifier width (spec strings; a converted network's own width).
        block_boundaries: module names that end a block; ``None``: the automatic cut.
        normalization: the images' per-channel ``(mean, std)``; ``None``: unknown.
        model_kwargs: a spec string's builder arguments.
        resolved_aux_head: ``"copy"`` or ``"slim"``, what ``aux_head`` meant for the network
            (set by ``to_local``; ``None`` before conversion).
        aux_follow: EMA momentum ``m`` with which AugLocal's copies follow their source blocks
            (plus a learned correction); ``None``: they do not (see :mod:`auglocal_fx.following`).
        aux_follow_adapted: copy parameters whose shape the adaptation changed keep their own
            weights (``"own"``) or follow the source's leading slice (``"slice"``).
        aux_freeze: auxiliary layers freeze top first, all frozen by this fraction of the run;
            ``None``: they train to the end.
        aux_tie: AugLocal's copies store no kernels of their own but read their sources' (detached),
            training only their 1-D parameters (see :mod:`auglocal_fx.tying`).
        aux_resolution: ``"paper"`` (at most one 2x reduction per copy, the authors') or
            ``"source"`` (each copy pooled to its source block's resolution first).
        shared_parameters: a parameter used by several blocks (or by blocks and the head):
            ``"sum"`` keeps the blocks and trains it by the sum of its users' local losses'
            gradients; ``"merge"`` merges the blocks between its uses, so one loss trains it
            (see docs/method.md, rule 1).
    """

    d: int = 2
    tau: float = 0.5
    pyramid: bool = True
    selection: str = "uniform"
    aux_head: str = "auto"
    rule: str = "auglocal"
    aux_init: str = "init"
    aux_checkpoint: bool = False
    input_size: Optional[Tuple[int, int, int]] = None
    num_classes: Optional[int] = None
    block_boundaries: Optional[Tuple[str, ...]] = None
    normalization: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]] = None
    model_kwargs: Optional[Mapping[str, Any]] = None
    resolved_aux_head: Optional[str] = None
    aux_follow: Optional[float] = None
    aux_follow_adapted: str = "own"
    aux_freeze: Optional[float] = None
    aux_tie: bool = False
    aux_resolution: str = "paper"
    shared_parameters: str = "sum"

    def __post_init__(self) -> None:
        validate_options(self.d, self.tau, self.selection)
        validate_aux_head(self.aux_head)
        validate_aux_init(self.aux_init)
        validate_aux_resolution(self.aux_resolution)
        validate_shared_parameters(self.shared_parameters)
        get_rule(self.rule)
        validate_follow(self.aux_follow, self.aux_follow_adapted)
        validate_freeze(self.aux_freeze)
        if not isinstance(self.aux_tie, bool):
            raise AugLocalError(f"aux_tie must be True or False, got {self.aux_tie!r}")
        if (self.aux_follow is not None or self.aux_freeze is not None or self.aux_tie) \
                and not get_rule(self.rule).uses_depth:
            raise AugLocalError(f"aux_follow, aux_freeze and aux_tie act on AugLocal's block copies; rule "
                                f"{self.rule!r} has none: use rule auglocal or auglocal+infopro, or leave them unset")
        if self.aux_tie and self.aux_follow is not None:
            raise AugLocalError("aux_tie and aux_follow both decide what a copy's weights are (its source's own "
                                "tensor, or an average of it plus a correction): choose one")
        if not isinstance(self.aux_checkpoint, bool):
            raise AugLocalError(f"aux_checkpoint must be True or False, got {self.aux_checkpoint!r}")
        if not isinstance(self.pyramid, bool):
            raise AugLocalError(f"pyramid must be True or False, got {self.pyramid!r}")
        if self.resolved_aux_head not in (None, "copy", "slim"):
            raise AugLocalError(f"resolved_aux_head must be 'copy' or 'slim', got {self.resolved_aux_head!r}")
        # Normal forms, so equal options compare equal however they were given.
        set_ = object.__setattr__  # frozen: __post_init__ is the one place that may
        set_(self, "tau", float(self.tau))
        for name in ("aux_follow", "aux_freeze"):
            if getattr(self, name) is not None:
                set_(self, name, float(getattr(self, name)))
        if self.input_size is not None:
            set_(self, "input_size", tuple(int(v) for v in self.input_size))
        if self.num_classes is not None:
            set_(self, "num_classes", int(self.num_classes))
        set_(self, "block_boundaries", tuple(self.block_boundaries) if self.block_boundaries else None)
        set_(self, "normalization", _checked_normalization(self.normalization, self.input_size))
        set_(self, "model_kwargs", dict(self.model_kwargs) if self.model_kwargs else None)

    def replace(self, **changes: Any) -> "ConversionOptions":
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def uses_depth(self) -> bool:
        """Whether ``d``, ``tau``, ``pyramid`` and ``selection`` shape the auxiliary networks."""
        return get_rule(self.rule).uses_depth

    def describe(self, style: str = "words") -> str:
        """The options in words; every place that prints options uses this.

        Args:
            style: ``"words"``: ``"d=6, tau=0.5, pyramid=True, selection=uniform"`` (a rule
                without depth: ``"rule=dgl, every block but the last trained locally"``);
                ``"brief"``: ``"auglocal d=6"`` or the rule's name; ``"method"``: ``"AugLocal"``
                or ``"local learning"``; ``"repr"``: the ``LocalNet`` repr's fields.
        """
        if style == "brief":
            return f"auglocal d={self.d}" if self.rule == "auglocal" else self.rule
        if style == "method":
            return "AugLocal" if self.rule == "auglocal" else "local learning"
        if style == "repr":
            return (f"d={self.d}, tau={self.tau}, pyramid={self.pyramid}, selection={self.selection!r}, "
                    f"aux_head={self.aux_head!r}"
                    + (f", rule={self.rule!r}" if self.rule != "auglocal" else "")
                    + (", aux_checkpoint=True" if self.aux_checkpoint else "")
                    + self._beyond(", {}={!r}"))
        if style != "words":
            raise AugLocalError(f"unknown describe style {style!r}: choose words, brief, method or repr")
        if not self.uses_depth:
            return f"rule={self.rule}, every block but the last trained locally"
        text = f"d={self.d}, tau={self.tau}, pyramid={self.pyramid}, selection={self.selection}"
        if self.rule != "auglocal":
            text += f", rule={self.rule}"
        if self.resolved_aux_head == "slim":
            text += ", slim auxiliary heads"
        return text + self._beyond(", {}={}")

    def _beyond(self, form: str) -> str:
        """The options beyond the paper's that are set, each as ``form.format(name, value)``."""
        names = ("aux_follow", "aux_follow_adapted") if self.aux_follow is not None else ()
        names += ("aux_freeze",) if self.aux_freeze is not None else ()
        names += ("aux_tie",) if self.aux_tie else ()
        names += ("aux_resolution",) if self.aux_resolution != "paper" else ()
        names += ("shared_parameters",) if self.shared_parameters != "sum" else ()
        return "".join(form.format(name, getattr(self, name)) for name in names)

    def to_dict(self) -> Dict[str, Any]:
        """The checkpoint's ``options`` dict (lists, not tuples; ``model_kwargs`` only when set)."""
        out: Dict[str, Any] = {
            "d": self.d, "tau": self.tau, "pyramid": self.pyramid, "selection": self.selection,
            "input_size": None if self.input_size is None else list(self.input_size),
            "num_classes": self.num_classes,
            "block_boundaries": None if self.block_boundaries is None else list(self.block_boundaries),
            "aux_head": self.aux_head, "rule": self.rule,
            "normalization": None if self.normalization is None else [list(v) for v in self.normalization],
            "aux_init": self.aux_init, "aux_checkpoint": self.aux_checkpoint,
            # Always written: a checkpoint without it was made when blocks sharing a parameter merged.
            "shared_parameters": self.shared_parameters,
        }
        if self.model_kwargs:
            out["model_kwargs"] = dict(self.model_kwargs)  # load() re-creates the model with them
        if self.resolved_aux_head is not None:
            out["resolved_aux_head"] = self.resolved_aux_head
        # Written only when set, so checkpoints without them read as before with older versions.
        if self.aux_follow is not None:
            out.update(aux_follow=self.aux_follow, aux_follow_adapted=self.aux_follow_adapted)
        if self.aux_freeze is not None:
            out["aux_freeze"] = self.aux_freeze
        if self.aux_tie:
            out["aux_tie"] = True
        if self.aux_resolution != "paper":
            out["aux_resolution"] = self.aux_resolution
        return out

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> "ConversionOptions":
        """Options from a checkpoint's ``options`` dict; keys older checkpoints lack take the
        values they had then (``aux_head="copy"``, ``rule="auglocal"``, ...).

        Raises:
            AugLocalError: for an unknown key or a bad value.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise AugLocalError(f"unknown conversion option(s) {', '.join(unknown)}; "
                                "was the checkpoint written by a newer auglocal-fx?")
        return cls(**{**_OLD_DEFAULTS, **options})


def conversion_options(options: Optional[ConversionOptions] = None, **kwargs: Any) -> ConversionOptions:
    """``options`` with the keyword arguments given (``None`` values left out) applied on top.

    Raises:
        AugLocalError: for an unknown keyword or a bad value.
    """
    base = ConversionOptions() if options is None else options
    if not isinstance(base, ConversionOptions):
        raise AugLocalError(f"options must be a ConversionOptions, not {type(base).__name__}")
    names = {f.name for f in dataclasses.fields(ConversionOptions)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise AugLocalError(f"unknown conversion option(s) {', '.join(unknown)}; see ConversionOptions")
    changes = {k: v for k, v in kwargs.items() if v is not None}
    return base.replace(**changes) if changes else base


def _checked_normalization(value: Optional[Sequence[Sequence[float]]],
                           input_size: Optional[Tuple[int, ...]]
                           ) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
    """``value`` as ``(mean, std)`` tuples, or an error saying what a normalization must be."""
    if value is None:
        return None
    channels = input_size[0] if input_size else None
    try:
        mean, std = (tuple(float(v) for v in part) for part in value)
    except (TypeError, ValueError):
        mean, std = (), ()
    if (not mean or len(mean) != len(std) or min(std) <= 0
            or (channels is not None and len(mean) not in (1, channels))):
        count = f"1 or {channels} values each" if channels is not None else "equally many values"
        raise AugLocalError(
            f"normalization must be (mean, std) with {count} and std > 0, not "
            f"{value!r}; pass the statistics the images were normalised with")
    return mean, std
