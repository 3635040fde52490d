"""``auglocal-fx convert``: convert a model, print its blocks and FLOPs, save a checkpoint."""

from __future__ import annotations

import json
import os
from typing import Optional

import click

from .options import (
    conversion_options,
    conversion_kwargs,
    depth_option,
    spec_argument,
    user_errors,
)

__all__ = ["convert", "default_checkpoint_name"]


def default_checkpoint_name(spec: str, d: int) -> str:
    """``timm:regnetx_004`` at ``d=6`` -> ``regnetx_004_d6.pt``."""
    tail = spec.rsplit(":", 1)[-1]
    name = os.path.splitext(os.path.basename(tail))[0] or "model"
    return f"{name}_d{d}.pt"


@click.command()
@spec_argument
@depth_option(required=False, help_text="Auxiliary depth: layers of each auxiliary network, "
              "classifier included (the paper uses 2..6). With --flops-budget: the largest d "
              "tried (default 6).")
@conversion_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Checkpoint to write (default: MODEL_dD.pt); restore with auglocal_fx.load.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead.")
@click.option("--flops-budget", default=None, metavar="X",
              help="Pick d and tau to fit a forward-FLOPs budget: a multiple of BP like 2.5x, "
                   "or an absolute figure like 1.1G or 800M (1 multiply-add = 1 FLOP).")
def convert(spec: str, d: Optional[int], tau, no_pyramid, selection, input_size, num_classes,
            output, as_json, flops_budget) -> None:
    """Convert SPEC into an AugLocal network and save it.

    SPEC is timm:NAME, torchvision:NAME, paper:resnet32|resnet110|vgg19 or path/file.py:factory.
    Prints one row per primary block (its auxiliary network's depth, copied blocks, FLOPs and
    parameters) and the totals. FLOPs follow fvcore: 1 multiply-add = 1 FLOP, one example.
    """
    from auglocal_fx import to_local
    from auglocal_fx.flops import count_flops, solve_budget
    from auglocal_fx.tables import describe_options, flops_table

    kwargs = conversion_kwargs(tau, no_pyramid, selection, input_size, num_classes)
    if d is None and flops_budget is None:
        raise click.ClickException(
            "give the auxiliary depth --d D (e.g. --d 2) or a --flops-budget like 3x")
    choice = None
    with user_errors():
        if flops_budget is not None:
            opts = {k: v for k, v in kwargs.items() if k != "tau"}
            choice = solve_budget(spec, flops_budget, max_d=d if d is not None else 6, **opts)
            d, kwargs["tau"] = choice.d, choice.tau
        local = to_local(spec, d=d, **kwargs)
        flops = count_flops(local)
        summary = flops.as_dict()
        path = output or default_checkpoint_name(spec, d)
        local.save(path)
    summary["model"] = spec
    summary["checkpoint"] = path
    if choice is not None:
        summary["budget"] = choice.as_dict()
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
    if choice is not None:
        click.echo(choice.reason)
    size = "x".join(map(str, local.input_size))
    click.echo(f"{spec} -> AugLocal ({describe_options(local)}), input {size}")
    click.echo(flops_table(flops))
    click.echo(f"saved {path}; restore with auglocal_fx.load({path!r})")
