"""``auglocal-fx analyze``: a thin click wrapper around ``auglocal_fx.analysis.compare``."""

import json

import click

from .options import user_errors


@click.command()
@click.argument("a", metavar="A", type=click.Path(exists=True))
@click.argument("b", metavar="B", type=click.Path(exists=True))
@click.option("--dataset", default=None,
              help="Dataset to compute the features on [default: the one A was trained on].")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Folder holding the dataset (never downloaded).")
@click.option("--batch-size", type=click.IntRange(min=4), default=256, show_default=True,
              help="CKA minibatch size (the last incomplete batch is dropped).")
@click.option("--test-subset", type=click.IntRange(min=4), default=None,
              help="Use a seeded random subset of this many test images [default: all].")
@click.option("--probe", is_flag=True, help="Also fit a linear probe on every block of both networks.")
@click.option("--probe-train-subset", type=click.IntRange(min=2), default=None,
              help="Fit the probes on this many training images [default: all].")
@click.option("--json", "json_file", default=None, metavar="FILE|-",
              help="Write the results as JSON to FILE, or print them instead of the table with -.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, metavar="FILE.png",
              help="Write the CKA (and probe) figure, as the paper's Figures 3 and 4.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu or cuda[:N].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the test and probe subsets.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def analyze(a, b, dataset, data_dir, batch_size, test_subset, probe, probe_train_subset, json_file, plot,
            device, seed, quiet):
    """Per-block CKA of two trainings A and B of the same network, and linear probes.

    A and B are `auglocal-fx train` outputs (the OUT folder or OUT/model.pt; the model and input
    size are read from OUT/last.pt) or LocalNet checkpoints, e.g. a BP and an AugLocal run.
    """
    from auglocal_fx.analysis import compare
    from auglocal_fx.tables import analysis_table

    with user_errors():
        if plot is not None:
            from auglocal_fx.plots import check_figure_path

            check_figure_path(plot)
        result = compare(a, b, dataset=dataset, data_dir=data_dir, batch_size=batch_size,
                         test_subset=test_subset, probe=probe, probe_train_subset=probe_train_subset,
                         device=device, seed=seed, progress=not quiet)
        if plot is not None:
            from auglocal_fx.plots import plot_analysis

            probes = {}
            if result.probe_a is not None:
                probes = {"A": result.probe_a.accuracy, "B": result.probe_b.accuracy}
            plot_analysis({"B": result.cka.values}, probes, plot,
                          title=f"A: {result.descriptions[0]}; B: {result.descriptions[1]}; {result.dataset}")
        record = result.to_dict()
        if plot is not None:
            record["plot"] = plot
        if json_file not in (None, "-"):
            with open(json_file, "w") as handle:
                json.dump(record, handle, indent=1)
    if json_file == "-":
        click.echo(json.dumps(record, indent=1))
        return
    click.echo(analysis_table(result))
    if json_file is not None:
        click.echo(f"JSON written to {json_file}")
    if plot is not None:
        click.echo(f"plot written to {plot}")
