"""``auglocal-fx convert``: convert a model, print its blocks and FLOPs, save a checkpoint."""

from __future__ import annotations

import gc
import json
import os
from typing import Callable, Optional

import click

from .options import (
    MultiValueCommand,
    aux_init_option,
    aux_resolution_option,
    beyond_options,
    conversion_options,
    conversion_from_flags,
    depth_option,
    spec_argument,
    user_errors,
    weights_option,
)

__all__ = ["convert"]


@click.command(cls=MultiValueCommand)
@spec_argument
@depth_option(required=False, help_text="Auxiliary depth: layers of each auxiliary network, "
              "classifier included (the paper uses 2..6). With --flops-budget: the largest d "
              "tried (default 6).")
@conversion_options
@weights_option
@aux_init_option
@beyond_options
@aux_resolution_option
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Write the converted network to FILE (default: nothing is written); restore "
                   "with auglocal_fx.load.")
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead.")
@click.option("--flops-budget", default=None, metavar="X",
              help="Pick d and tau to fit a forward-FLOPs budget: a multiple of BP like 2.5x, "
                   "or an absolute figure like 1.1G or 800M (1 multiply-add = 1 FLOP).")
def convert(spec: str, d: Optional[int], tau, no_pyramid, selection, rule, aux_head, input_size,
            num_classes, model_kwargs, weights, aux_init, aux_follow, aux_follow_adapted, aux_freeze, aux_tie,
            aux_resolution, output, force, as_json, flops_budget) -> None:
    """Convert SPEC into an AugLocal network; print it, and save it with -o FILE.

    SPEC is timm:NAME, torchvision:NAME, paper:resnet32|resnet110|vgg19 or path/file.py:factory.
    Prints one row per primary block (its auxiliary network's depth, copied blocks, FLOPs and
    parameters) and the totals. FLOPs follow fvcore: 1 multiply-add = 1 FLOP, one example.
    """
    click.get_current_context().call_on_close(_pause_collection())
    from auglocal_fx import to_local
    from auglocal_fx.budget import solve_budget
    from auglocal_fx.flops import FlopCache, count_flops
    from auglocal_fx.tables import flops_table

    options = conversion_from_flags(tau, no_pyramid, selection, input_size, num_classes, aux_head,
                                    rule, model_kwargs, aux_init=aux_init, aux_follow=aux_follow,
                                    aux_follow_adapted=aux_follow_adapted, aux_freeze=aux_freeze, aux_tie=aux_tie,
                                    aux_resolution=aux_resolution)
    if d is None and not options.uses_depth:
        d = 2  # the baselines train every block but the last; d does not apply
    if d is None and flops_budget is None:
        raise click.ClickException(
            "give the auxiliary depth --d D (e.g. --d 2) or a --flops-budget like 3x")
    if flops_budget is not None and (tau is not None or no_pyramid):
        raise click.ClickException(
            "--flops-budget chooses tau itself; drop --tau/--no-pyramid, or drop --flops-budget "
            "and give --d and --tau")
    if force and output is None:
        raise click.ClickException("--force replaces the file given with -o FILE; give -o FILE")
    if output is not None and os.path.exists(output) and not force:
        raise click.ClickException(f"{output} exists; pass --force to replace it, or choose another -o FILE")
    choice = None
    counts = FlopCache()  # the budget's counts serve the chosen network's
    with user_errors():
        if flops_budget is not None:
            choice = solve_budget(spec, flops_budget, max_d=d if d is not None else 6, options=options,
                                  cache=counts)
            d, options = choice.d, options.replace(tau=choice.tau)
        local = to_local(spec, d=d, weights=weights, options=options)
        flops = count_flops(local, counts)
        summary = flops.as_dict()
        if output is not None:
            local.save(output)
    summary["model"] = spec
    summary["checkpoint"] = output
    if choice is not None:
        summary["budget"] = choice.as_dict()
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
    if choice is not None:
        click.echo(choice.reason)
    size = "x".join(map(str, local.input_size))
    conversion = local.conversion
    click.echo(f"{spec} -> {conversion.describe('method')} ({conversion.describe()}), input {size}")
    click.echo(flops_table(flops))
    if output is not None:
        click.echo(f"saved {output}; restore with auglocal_fx.load({output!r})")


def _pause_collection() -> Callable[[], None]:
    """Pause Python's cycle collector for one conversion; returns what resumes it.

    A conversion leaves little cyclic garbage (RegNetX-400MF at d=6: 8 MB more peak memory
    without collecting), while each full collection re-scans every object torch, timm and fvcore
    keep alive (about 10^6): an eighth of ``convert timm:regnetx_004 --d 6``.
    """
    if not gc.isenabled():
        return lambda: None
    gc.disable()
    return gc.enable
