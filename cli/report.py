"""``auglocal-fx report``: the paper's Table 7 (FLOPs, params, memory, time) for any model."""

from __future__ import annotations

import json

import click

from .options import (
    conversion_options,
    MultiValueCommand,
    aux_resolution_option,
    beyond_options,
    RegistryChoice,
    conversion_from_flags,
    depths_option,
    spec_argument,
    user_errors,
)

from auglocal_fx.costs import report_rules
from auglocal_fx.memory import OPTIMIZERS

__all__ = ["report"]

_AUX_CHECKPOINT = {"off": (False,), "on": (True,), "both": (False, True)}


@click.command(cls=MultiValueCommand)
@spec_argument
@depths_option
@click.option("--batch-size", type=int, default=128, show_default=True, metavar="B",
              help="Batch size of the memory and time measurements.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@conversion_options
@beyond_options
@aux_resolution_option
@click.option("--rules", type=RegistryChoice(report_rules), multiple=True, metavar="RULE...",
              help="Rows to compare, e.g. --rules bp gc dgl predsim infopro auglocal (gc = gradient "
                   "checkpointing; rules with a depth get a row per --d) [default: bp gc auglocal].")
@click.option("--aux-checkpoint", type=click.Choice(list(_AUX_CHECKPOINT)), default="both", show_default=True,
              help="Local rows with activations kept (off), primary blocks recomputed in backward "
                   "one at a time (on, the '+recompute' rows) or both, to compare peak memory and step time. FLOPs-only "
                   "reports show 'off' only: recomputation does not change the forward FLOPs.")
@click.option("--step-each-module", "step_each", type=click.Choice(["off", "on", "both"]), default="both",
              show_default=True,
              help="Local rows with every gradient kept to the end of the step (off), each local module's "
                   "dropped after its backward as the trainer's --step-each-module does (on, the '+step each' "
                   "rows) or both. FLOPs-only reports show 'off' only.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="sgd", show_default=True,
              help="Whose state the whole peak holds: SGD momentum (the paper's) or AdamW.")
@click.option("--flops-only", "--no-memory", "flops_only", is_flag=True,
              help="Count FLOPs and parameters only: no memory or time measurement (fast).")
@click.option("--rss", is_flag=True,
              help="On CPU, also measure the peak RSS of each step in a fresh process (slower).")
@click.option("--repeats", type=click.IntRange(1, 100), default=2, show_default=True,
              help="Timed training steps per method, after one warm-up step.")
@click.option("--threads", type=click.IntRange(1), default=None, metavar="N",
              help="CPU threads for the timed steps (default: PyTorch's).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, metavar="FILE.png",
              help="Draw FLOPs and memory per method and the per-block profile (.png/.svg).")
def report(spec, depths, batch_size, device, tau, no_pyramid, selection, rule, aux_head,
           input_size, num_classes, model_kwargs, aux_follow, aux_follow_adapted, aux_freeze, aux_tie,
           aux_resolution, rules, aux_checkpoint, step_each, optimizer, flops_only, rss, repeats, threads, as_json,
           plot) -> None:
    """Compare BP, gradient checkpointing and AugLocal at each d for SPEC.

    Rows: forward FLOPs (fvcore: 1 multiply-add = 1 FLOP, one example), trained parameters,
    measured memory (only when auglocal_fx.memory can measure it; never estimated): the bytes
    saved for backward (CUDA: the allocator's peak) and the whole peak (parameters + gradients
    + optimizer state + saved bytes), and time per training step at --batch-size.
    """
    from auglocal_fx.costs import cost_report
    from auglocal_fx.tables import cost_table

    # The report's rows are --rules; --rule only stands for BP, GC and that rule.
    options = conversion_from_flags(tau, no_pyramid, selection, input_size, num_classes, aux_head,
                                    model_kwargs=model_kwargs, aux_follow=aux_follow,
                                    aux_follow_adapted=aux_follow_adapted, aux_freeze=aux_freeze, aux_tie=aux_tie,
                                    aux_resolution=aux_resolution)
    if rules and click.get_current_context().get_parameter_source("rule") \
            is not click.core.ParameterSource.DEFAULT:
        raise click.ClickException("give --rule or --rules, not both: --rules lists every row")
    if rule != "auglocal" and not rules:
        rules = ("bp", "gc", rule)
    with user_errors():
        if plot is not None:
            from auglocal_fx.plots import check_figure_path
            check_figure_path(plot)
        result = cost_report(spec, tuple(depths), batch_size=batch_size, device=device,
                             memory=not flops_only, rss=rss, timing=not flops_only,
                             repeats=repeats, threads=threads,
                             rules=tuple(rules) or ("bp", "gc", "auglocal"),
                             aux_checkpoint=_AUX_CHECKPOINT["off" if flops_only else aux_checkpoint],
                             optimizer=optimizer, options=options,
                             step_each_module=_AUX_CHECKPOINT["off" if flops_only else step_each])
        if plot is not None:
            from auglocal_fx.plots import plot_report
            plot_report(result, plot)
    if as_json:
        out = result.as_dict()
        if plot is not None:
            out["plot"] = plot
        click.echo(json.dumps(out, indent=1))
        return
    click.echo(f"{spec} at {'x'.join(map(str, result.input_size))}, batch {batch_size}, "
               f"{result.device}")
    click.echo(cost_table(result))
    if plot is not None:
        click.echo(f"plot written to {plot}")
