"""Option decorators shared by the ``auglocal-fx`` commands, and the error boundary."""

from __future__ import annotations

import contextlib
import os
import re
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import click

from auglocal_fx.errors import AugLocalError
from auglocal_fx.following import FOLLOW_ADAPTED
from auglocal_fx.options import ConversionOptions
from auglocal_fx.options import conversion_options as build_options  # the name below is the decorator
from auglocal_fx.planning import SELECTIONS
from auglocal_fx.rules import rule_names
from auglocal_fx.synthesis import AUX_HEADS, AUX_INITS, AUX_RESOLUTIONS

__all__ = [
    "conversion_options",
    "spec_argument",
    "input_size_option",
    "num_classes_option",
    "depth_option",
    "depths_option",
    "pyramid_options",
    "selection_option",
    "aux_head_option",
    "rule_option",
    "model_kwargs_option",
    "weights_option",
    "aux_init_option",
    "beyond_options",
    "aux_resolution_option",
    "MultiValueCommand",
    "RegistryChoice",
    "user_errors",
    "conversion_from_flags",
    "is_checkpoint",
]

_INT = re.compile(r"^-?\d+$")


def spec_argument(fn):
    """``SPEC``: ``timm:NAME``, ``torchvision:NAME``, ``paper:NAME`` or ``file.py:factory``."""
    return click.argument("spec", metavar="SPEC")(fn)


def input_size_option(fn):
    """``--input-size C H W`` (default: the model's own, e.g. 3 224 224 for timm models)."""
    return click.option(
        "--input-size", nargs=3, type=int, default=None, metavar="C H W",
        help="Input size the network is traced and counted at (default: the model's own).",
    )(fn)


def num_classes_option(fn):
    """``--num-classes N`` (default: the model's own)."""
    return click.option(
        "--num-classes", type=int, default=None, metavar="N",
        help="Classifier width (default: the model's own).",
    )(fn)


def depth_option(required: bool = True, default: Optional[int] = None, help_text: str = ""):
    """``--d D``: the auxiliary depth (the paper's d, classifier included)."""
    def decorator(fn):
        return click.option(
            "--d", "d", type=int, required=required, default=default, metavar="D",
            help=help_text or "Auxiliary depth: layers of each auxiliary network, classifier "
                              "included (the paper uses 2..6).",
        )(fn)
    return decorator


def depths_option(fn):
    """``--d 2 3 4 5 6``: several depths (use with ``cls=MultiValueCommand``)."""
    return click.option(
        "--d", "depths", type=int, multiple=True, default=(2, 3, 4, 5, 6), show_default=True,
        metavar="D [D ...]", help="Auxiliary depths to report, e.g. --d 2 3 4 5 6.",
    )(fn)


def pyramid_options(fn):
    """``--tau T`` (pyramid decay, default 0.5) or ``--no-pyramid`` (constant depth)."""
    fn = click.option(
        "--no-pyramid", is_flag=True, default=False,
        help="Give every auxiliary network depth d (no pyramidal decay).",
    )(fn)
    return click.option(
        "--tau", type=float, default=None, metavar="T",
        help="Pyramidal depth decay in [0, 1] (default 0.5; 0 = constant depth).",
    )(fn)


def selection_option(fn):
    """``--selection uniform|sequential|repetitive``."""
    return click.option(
        "--selection", type=click.Choice(SELECTIONS), default="uniform", show_default=True,
        help="Which later blocks an auxiliary network copies (the paper's method is uniform).",
    )(fn)


def aux_head_option(fn):
    """``--aux-head auto|copy|slim``."""
    return click.option(
        "--aux-head", type=click.Choice(AUX_HEADS), default="auto", show_default=True,
        help="Auxiliary networks' head: a copy of the model's head, the authors' slim 512-wide MLP "
             "head, or auto (slim where the head holds half of the parameters or more, as VGG's).",
    )(fn)


class RegistryChoice(click.Choice):
    """A choice read from a registry when the command runs, so a rule registered after the CLI
    was imported (a plug-in's file) is a choice too."""

    def __init__(self, names: Callable[[], Sequence[str]]):
        self._names = names
        super().__init__(list(names()))

    @property
    def choices(self) -> Tuple[str, ...]:
        return tuple(self._names())

    @choices.setter
    def choices(self, value) -> None:
        pass  # always the registry's


def rule_option(fn):
    """``--rule NAME``: a registered local learning rule (``auglocal_fx.rules``)."""
    return click.option(
        "--rule", type=RegistryChoice(rule_names), default="auglocal", show_default=True,
        help="Local learning rule: AugLocal, or the paper's comparison systems (they train every "
             "block but the last locally and ignore --d/--tau).",
    )(fn)


# -- model creation and starting weights


def _parse_model_kwargs(ctx, param, pairs):
    from auglocal_fx.specs import parse_model_kwargs

    with user_errors():
        return parse_model_kwargs(pairs) or None


def model_kwargs_option(fn):
    """``--model-kwargs KEY=VALUE ...`` (use with ``cls=MultiValueCommand``): builder arguments."""
    return click.option(
        "--model-kwargs", "model_kwargs", multiple=True, callback=_parse_model_kwargs,
        metavar="KEY=VALUE ...",
        help="Arguments for the model's builder (timm.create_model, torchvision, the file's "
             "factory), e.g. --model-kwargs patch_size=4 img_size=32 depth=6; values are Python "
             "literals where they parse, else strings.",
    )(fn)


def weights_option(fn):
    """``--weights FILE``: a local state dict or timm / torchvision checkpoint to start from."""
    return click.option(
        "--weights", type=click.Path(dir_okay=False), default=None, metavar="FILE",
        help="Start from these weights: a state_dict or a timm / torchvision training checkpoint "
             "(never downloaded); a classifier for another number of classes is left out.",
    )(fn)


def aux_init_option(fn):
    """``--aux-init init|copy``."""
    return click.option(
        "--aux-init", type=click.Choice(AUX_INITS), default="init", show_default=True,
        help="How auxiliary copies start: drawn afresh by the model's init rule (the paper), or "
             "the copied blocks' weights where the shape allows (fine-tuning with --weights).",
    )(fn)


def _aux_tie_option(fn):
    """``--aux-tie``: AugLocal's copies read their source blocks' kernels (issue 24)."""
    return click.option(
        "--aux-tie", is_flag=True, default=None,
        help="AugLocal's copies store no kernels but read their source blocks' (detached), training only "
             "their biases and norms: almost no auxiliary parameters (docs/method.md, Beyond AugLocal).",
    )(fn)


def beyond_options(fn):
    """``--aux-follow M``, ``--aux-follow-adapted own|slice``, ``--aux-freeze F``, ``--aux-tie``
    (docs/method.md, Beyond AugLocal); ``None`` for each not given."""
    fn = _aux_tie_option(fn)
    fn = click.option("--aux-freeze", type=float, default=None,
                      help="Freeze auxiliary layers top first, all frozen by this fraction of the run (e.g. 0.3).")(fn)
    fn = click.option("--aux-follow-adapted", type=click.Choice(FOLLOW_ADAPTED), default=None,
                      help="Re-fitted copy layers keep their own weights or follow the source's slice "
                           "[default: own].")(fn)
    return click.option("--aux-follow", type=float, default=None,
                        help="AugLocal's copies follow their source blocks by an EMA of this momentum "
                             "(e.g. 0.9), plus a learned correction.")(fn)


def aux_resolution_option(fn):
    """``--aux-resolution paper|source``."""
    return click.option(
        "--aux-resolution", type=click.Choice(AUX_RESOLUTIONS), default="paper", show_default=True,
        help="Where auxiliary copies run: at most one 2x reduction per copy (the paper), or "
             "pooled to their source block's resolution first (less memory on deep pyramids).",
    )(fn)


def conversion_from_flags(tau: Optional[float], no_pyramid: bool, selection: str, input_size,
                          num_classes: Optional[int], aux_head: str = "auto", rule: str = "auglocal",
                          model_kwargs: Optional[dict] = None, **more) -> ConversionOptions:
    """The ``ConversionOptions`` the shared flags stand for; ``more``: the
    command's own (``d``, ``aux_init``, ``aux_resolution``, ``aux_checkpoint``; ``None`` for not
    given).

    Raises:
        click.ClickException: for both ``--tau`` and ``--no-pyramid``, or what the library rejects.
    """
    if tau is not None and no_pyramid:
        raise click.ClickException("give --tau or --no-pyramid, not both")
    with user_errors():
        return build_options(
            tau=tau, pyramid=False if no_pyramid else None, selection=selection, aux_head=aux_head,
            rule=rule, input_size=tuple(input_size) if input_size else None, num_classes=num_classes,
            model_kwargs=model_kwargs or None, **more)


class MultiValueCommand(click.Command):
    """A command whose ``--d``, ``--rules`` and ``--model-kwargs`` take several values:
    ``--d 2 3 4`` means ``--d 2 --d 3 --d 4``.

    click options take a fixed number of values; this rewrites the arguments before parsing,
    for those of the command's options that take ``multiple`` values.
    """

    multi_value_options = {"--d": _INT, "--rules": re.compile(r"^[a-z+]+$"),
                           "--model-kwargs": re.compile(r"^[A-Za-z_]\w*=")}

    def parse_args(self, ctx: click.Context, args: List[str]) -> List[str]:
        multiple = {opt for p in self.params if isinstance(p, click.Option) and p.multiple
                    for opt in p.opts}
        out: List[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            out.append(arg)
            i += 1
            if arg in self.multi_value_options and arg in multiple:
                if i < len(args):  # the first value, whatever it is (click checks it)
                    out.append(args[i])
                    i += 1
                while i < len(args) and self.multi_value_options[arg].match(args[i]):
                    out += [arg, args[i]]
                    i += 1
            elif arg == "--":
                out += args[i:]
                break
        return super().parse_args(ctx, out)


def _one_line(message: str) -> str:
    return " ".join(str(message).split()) or "failed"


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn library errors a user can cause into one-line click errors (no traceback)."""
    try:
        yield
    except AugLocalError as exc:
        raise click.ClickException(_one_line(str(exc))) from None
    except OSError as exc:  # unwritable output path, full disk, ...
        name = getattr(exc, "filename", None)
        where = f" {name!r}" if name else ""
        raise click.ClickException(
            _one_line(f"cannot access{where}: {exc.strerror or exc}; check the path")
        ) from None


def is_checkpoint(spec: str) -> bool:
    """Whether ``spec`` names a saved ``LocalNet`` file rather than a model."""
    return spec.endswith((".pt", ".pth", ".ckpt")) or (
        os.path.isfile(spec) and not spec.endswith(".py"))


def conversion_options(fn):
    """The conversion options every model command shares: pyramid, selection, auxiliary head,
    input size, number of classes, builder arguments (use with ``cls=MultiValueCommand``)."""
    for option in (model_kwargs_option, num_classes_option, input_size_option, aux_head_option,
                   rule_option, selection_option, pyramid_options):
        fn = option(fn)
    return fn
