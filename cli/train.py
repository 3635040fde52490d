"""``auglocal-fx train``: a thin click wrapper around :func:`auglocal_fx.training.train`."""

import os

import click

from .options import (aux_head_option, rule_option, conversion_kwargs, depth_option, input_size_option, pyramid_options,
                      selection_option, spec_argument, user_errors)


@click.command()
@spec_argument
@click.option("--dataset", default=None,
              help="cifar10, svhn, stl10, fashion-mnist, digits, imagefolder:PATH or synthetic "
                   "[default: fashion-mnist when its Debian package is installed, else digits].")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Folder holding the dataset (never downloaded).")
@click.option("--method", type=click.Choice(["auglocal", "bp"]), default="auglocal", show_default=True,
              help="AugLocal local learning, or end-to-end backprop for comparison.")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Global batch size [default: 1024 for cifar10/svhn, else 128].")
@click.option("--lr", type=float, default=None, help="Peak learning rate [default: 0.1 * batch / 128].")
@click.option("--warmup-epochs", type=click.IntRange(min=0), default=10, show_default=True,
              help="Linear warmup from lr 0.01 into the per-epoch cosine schedule (the paper's 10).")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD (Nesterov) momentum.")
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@depth_option(required=False, default=2, help_text="Auxiliary depth, classifier included [default: 2].")
@pyramid_options
@selection_option
@aux_head_option
@rule_option
@click.option("--aux-checkpoint", is_flag=True,
              help="Recompute the auxiliary networks' forwards in backward instead of keeping their "
                   "activations: same gradients, less memory, one more auxiliary forward per step.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/auglocal", show_default=True,
              help="Output folder: metrics.jsonl, curves.png, last.pt, model.pt.")
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--amp", type=click.Choice(["none", "bf16", "fp16"]), default="none", show_default=True,
              help="Mixed precision (fp16 needs CUDA).")
@click.option("--grad-clip", type=float, default=None, help="Max gradient norm per local module.")
@click.option("--label-smoothing", type=float, default=0.0, show_default=True)
@click.option("--channels-last/--no-channels-last", default=None, help="NHWC tensors [default: on with CUDA].")
@input_size_option
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after this many steps.")
@click.option("--train-subset", type=click.IntRange(min=1), default=None,
              help="Train on a fixed random subset of this many images.")
@click.option("--test-subset", type=click.IntRange(min=1), default=None,
              help="Evaluate on a fixed random subset of this many images.")
@click.option("--no-augment", is_flag=True, help="Switch off the training augmentation.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="DataLoader workers.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Data-parallel processes to spawn (or launch with torchrun --nproc-per-node N).")
@click.option("--pipeline", type=click.IntRange(min=1), default=1, show_default=True,
              help="Pipeline workers, each owning a contiguous range of local modules (K x --nproc "
                   "processes; under torchrun the launched processes are split into pipelines of K).")
@click.option("--pipeline-balance", type=click.Choice(["time", "flops"]), default="time", show_default=True,
              help="Split the local modules by their measured step time or by their FLOPs.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads per process [default: the cores, shared by spawned processes].")
@click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
def train(spec, dataset, data_dir, method, epochs, batch_size, lr, warmup_epochs, momentum, weight_decay, d, tau, no_pyramid,
          selection, aux_head, rule, aux_checkpoint, out, resume, seed, device, amp, grad_clip, label_smoothing, channels_last, input_size,
          max_steps, train_subset, test_subset, no_augment, workers, nproc, pipeline, pipeline_balance, threads, quiet):
    """Train SPEC (e.g. paper:resnet32, timm:resnet18) with AugLocal or backprop."""
    from auglocal_fx.training import TrainConfig, train as run_training

    with user_errors():
        options = conversion_kwargs(tau, no_pyramid, selection, input_size, None, aux_head, rule)
        config = TrainConfig(
            model=spec, dataset=dataset, data_dir=data_dir, out=out, method=method, epochs=epochs,
            batch_size=batch_size, lr=lr, warmup_epochs=warmup_epochs, momentum=momentum, weight_decay=weight_decay, d=d,
            tau=options["tau"], pyramid=options["pyramid"], selection=options["selection"],
            aux_head=options["aux_head"], rule=options["rule"], aux_checkpoint=aux_checkpoint, seed=seed,
            device=device, amp=amp, grad_clip=grad_clip, label_smoothing=label_smoothing,
            channels_last=channels_last, input_size=options.get("input_size"), max_steps=max_steps,
            train_subset=train_subset, test_subset=test_subset, augment=not no_augment, num_workers=workers,
            nproc=nproc, pipeline=pipeline, pipeline_balance=pipeline_balance, threads=threads, resume=resume,
            progress=not quiet)
        result = run_training(config)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports
    aux = ""
    if result.aux_acc:
        aux = f"; auxiliary nets {min(result.aux_acc):.2f}..{max(result.aux_acc):.2f}%"
    click.echo(f"test accuracy {result.test_acc:.2f}% (primary network){aux}")
    click.echo(f"weights for the original model: {result.model_path}")
