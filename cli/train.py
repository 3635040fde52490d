"""``auglocal-fx train``: a thin click wrapper around ``auglocal_fx.training.train``."""

import os

import click

from auglocal_fx.train_config import AMP_MODES, DEFAULT_EPOCHS, METHODS, PIPELINE_BALANCES

from .options import (aux_head_option, rule_option, conversion_from_flags, depth_option, input_size_option, pyramid_options,
                      selection_option, spec_argument, user_errors)
from .options import (MultiValueCommand, aux_init_option, aux_resolution_option, beyond_options,
                      model_kwargs_option, weights_option)


@click.command(cls=MultiValueCommand)
@spec_argument
@model_kwargs_option
@weights_option
@aux_init_option
@aux_resolution_option
@click.option("--dataset", default=None,
              help="cifar10, svhn, stl10, fashion-mnist, digits, imagefolder:PATH or synthetic "
                   "[default: fashion-mnist when its Debian package is installed, else digits].")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Folder holding the dataset (never downloaded).")
@click.option("--method", type=click.Choice(METHODS), default="auglocal", show_default=True,
              help="AugLocal local learning, or end-to-end backprop for comparison.")
@click.option("--epochs", type=click.IntRange(min=1), default=DEFAULT_EPOCHS, show_default=True,
              help="Passes over the training set (the paper: 400 on CIFAR-10).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Global batch size [default: 1024 for cifar10/svhn, else 128].")
@click.option("--lr", type=float, default=None, help="Peak learning rate [default: 0.1 * batch / 128].")
@click.option("--warmup-epochs", type=click.IntRange(min=0), default=None,
              help="Linear warmup epochs [default: the paper's 10 scaled to the run, min(10, epochs // 20): "
                   "none below 20 epochs].")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="Momentum (SGD family).")
@click.option("--weight-decay", type=float, default=1e-4, show_default=True,
              help="On every parameter for the paper's recipe; else not on norms and biases, as timm does.")
# -- optimizer and schedule
@click.option("--opt", default="sgd", show_default=True,
              help="A timm optimizer: sgd (Nesterov, the paper's), momentum, adamw, lamb, ...")
@click.option("--opt-eps", type=float, default=None, help="The optimizer's eps (Adam family).")
@click.option("--opt-betas", type=float, nargs=2, default=None, help="The optimizer's betas (Adam family).")
@click.option("--sched", default="paper", show_default=True,
              help="paper (the authors' per-epoch cosine with warmup) or a timm scheduler: cosine, step, "
                   "multistep, poly, tanh, wsd, rsqrt, constant.")
@click.option("--warmup-lr", type=float, default=None,
              help="Rate the warmup starts from [default: 0.01 for paper, 1e-5 for timm schedules].")
@click.option("--min-lr", type=float, default=0.0, show_default=True, help="Floor of a timm schedule.")
@click.option("--sched-on-updates", is_flag=True, help="Step a timm schedule every update, not every epoch.")
@click.option("--decay-epochs", type=float, default=None, help="Step schedule interval [default: timm's 90].")
@click.option("--decay-rate", type=float, default=0.1, show_default=True, help="Step schedule factor.")
# -- regularisation
@click.option("--mixup", type=float, default=0.0, show_default=True, help="timm Mixup alpha (0: off).")
@click.option("--cutmix", type=float, default=0.0, show_default=True, help="timm CutMix alpha (0: off).")
@click.option("--mixup-prob", type=float, default=1.0, show_default=True, help="Chance a batch is mixed.")
@click.option("--mixup-switch-prob", type=float, default=0.5, show_default=True,
              help="Chance of cutmix instead of mixup when both are on.")
@click.option("--model-ema", is_flag=True, help="Keep and evaluate an EMA of the primary weights.")
@click.option("--model-ema-decay", type=float, default=0.9998, show_default=True)
# --
@depth_option(required=False, default=2, help_text="Auxiliary depth, classifier included [default: 2].")
@pyramid_options
@selection_option
@aux_head_option
@rule_option
@click.option("--aux-checkpoint", is_flag=True,
              help="Recompute each primary block in backward on its own instead of keeping its "
                   "activations, so a local module holds one piece at a time: same gradients, less "
                   "memory, one more forward of the primary network per step.")
@beyond_options
@click.option("--step-each-module/--step-at-end", default=None,
              help="Step each local module as soon as its loss is back-propagated and drop its gradients "
                   "(at most one module's exist at a time; the same weights), or step once at the end "
                   "[default: each module where that is exact (PyTorch's optimizers: sgd, adamw, ...)].")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Peak memory a training step may hold, e.g. 8GB or 7.5GiB: measure each way of "
                   "training (aux checkpointing, stepping each module) and take the fastest that fits.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/auglocal", show_default=True,
              help="Output folder: metrics.jsonl, curves.png, last.pt, model.pt.")
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--amp", type=click.Choice(AMP_MODES), default="none", show_default=True,
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
@click.option("--pipeline-balance", type=click.Choice(PIPELINE_BALANCES), default="time", show_default=True,
              help="Split the local modules by their measured step time or by their FLOPs.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads per process [default: the cores, shared by spawned processes].")
@click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
def train(spec, model_kwargs, weights, aux_init, aux_resolution, dataset, data_dir, method, epochs, batch_size, lr, warmup_epochs, momentum, weight_decay,
          opt, opt_eps, opt_betas, sched, warmup_lr, min_lr, sched_on_updates, decay_epochs, decay_rate,
          mixup, cutmix, mixup_prob, mixup_switch_prob, model_ema, model_ema_decay, d, tau, no_pyramid,
          selection, aux_head, rule, aux_checkpoint, aux_follow, aux_follow_adapted, aux_freeze, aux_tie, step_each_module, max_memory, out, resume, seed, device, amp, grad_clip, label_smoothing, channels_last, input_size,
          max_steps, train_subset, test_subset, no_augment, workers, nproc, pipeline, pipeline_balance, threads, quiet):
    """Train SPEC (e.g. paper:resnet32, timm:resnet18) with AugLocal or backprop.

    The defaults are the paper's recipe (SGD with Nesterov momentum, per-epoch cosine) for 10
    epochs; a transformer's recipe reads: --opt adamw --lr 1e-3 --weight-decay 0.05
    --sched cosine --warmup-epochs 5 --mixup 0.8 --cutmix 1.0 --model-ema.
    """
    from auglocal_fx.training import TrainConfig, train as run_training

    with user_errors():
        options = conversion_from_flags(tau, no_pyramid, selection, input_size, None, aux_head, rule,
                                        d=d, aux_init=aux_init, aux_resolution=aux_resolution,
                                        aux_checkpoint=aux_checkpoint,
                                        aux_follow=aux_follow, aux_follow_adapted=aux_follow_adapted,
                                        aux_freeze=aux_freeze, aux_tie=aux_tie)
        config = TrainConfig(
            model=spec, dataset=dataset, data_dir=data_dir, out=out, method=method, epochs=epochs,
            batch_size=batch_size, lr=lr, warmup_epochs=warmup_epochs, momentum=momentum, weight_decay=weight_decay,
            conversion=options, seed=seed,
            device=device, amp=amp, grad_clip=grad_clip, label_smoothing=label_smoothing,
            channels_last=channels_last, max_steps=max_steps,
            train_subset=train_subset, test_subset=test_subset, augment=not no_augment, num_workers=workers,
            nproc=nproc, pipeline=pipeline, pipeline_balance=pipeline_balance, threads=threads, resume=resume,
            progress=not quiet,
            opt=opt, opt_eps=opt_eps, opt_betas=opt_betas or None, sched=sched, warmup_lr=warmup_lr, min_lr=min_lr,
            sched_on_updates=sched_on_updates, decay_epochs=decay_epochs, decay_rate=decay_rate,
            mixup=mixup, cutmix=cutmix, mixup_prob=mixup_prob, mixup_switch_prob=mixup_switch_prob,
            model_ema=model_ema, model_ema_decay=model_ema_decay,
            model_kwargs=model_kwargs, weights=weights, step_each_module=step_each_module, max_memory=max_memory)
        result = run_training(config)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports
    if result.history and result.history[-1].get("max_memory"):
        click.echo(f"chosen for {result.history[-1]['max_memory']}")
    aux = ""
    if result.aux_acc:
        aux = f"; auxiliary nets {min(result.aux_acc):.2f}..{max(result.aux_acc):.2f}%"
    click.echo(f"test accuracy {result.test_acc:.2f}% (primary network){aux}")
    if result.test_acc_ema is not None:
        click.echo(f"test accuracy {result.test_acc_ema:.2f}% (EMA of the primary weights: {result.model_path[:-3]}_ema.pt)")
    click.echo(f"weights for the original model: {result.model_path}")
