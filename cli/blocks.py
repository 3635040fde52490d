"""``auglocal-fx blocks``: the partition into local blocks, as a table or a diagram."""

from __future__ import annotations

import click

from .options import (
    MultiValueCommand,
    aux_resolution_option,
    conversion_options,
    conversion_from_flags,
    depth_option,
    is_checkpoint,
    spec_argument,
    user_errors,
)

__all__ = ["blocks"]


@click.command(cls=MultiValueCommand)
@spec_argument
@depth_option(required=False, default=2)
@conversion_options
@aux_resolution_option
@click.option("--svg", "figure", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Also draw the blocks and what each auxiliary network copies (.svg or .png).")
def blocks(spec, d, tau, no_pyramid, selection, rule, aux_head, input_size, num_classes,
           model_kwargs, aux_resolution, figure) -> None:
    """Show how SPEC is cut into local blocks and what each auxiliary network copies.

    SPEC is a model spec (timm:NAME, torchvision:NAME, paper:NAME, path/file.py:factory) or a
    checkpoint written by `auglocal-fx convert` (then the saved options are used).
    """
    from auglocal_fx import load, to_local
    from auglocal_fx.flops import count_flops
    from auglocal_fx.plots import plot_blocks
    from auglocal_fx.tables import blocks_table

    options = conversion_from_flags(tau, no_pyramid, selection, input_size, num_classes, aux_head,
                                    rule, model_kwargs, aux_resolution=aux_resolution)
    if is_checkpoint(spec):
        ctx = click.get_current_context()
        given = [f"--{name.replace('_', '-')}" for name in
                 ("d", "tau", "no_pyramid", "selection", "rule", "aux_head", "input_size",
                  "num_classes", "model_kwargs", "aux_resolution")
                 if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise click.ClickException(
                f"{spec} is a checkpoint: it brings its own options, so {', '.join(given)} cannot "
                "apply; drop them, or give a model spec instead")
    with user_errors():
        if figure is not None:
            from auglocal_fx.plots import check_figure_path
            check_figure_path(figure)
        local = load(spec) if is_checkpoint(spec) else to_local(spec, d=d, options=options)
        flops = count_flops(local)
        click.echo(blocks_table(flops))
        if figure is not None:
            plot_blocks(flops, figure)
            click.echo(f"diagram written to {figure}")
