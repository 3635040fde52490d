"""What is alive at the whole-count peak of one training step, tensor group by tensor group (issue 22).

    python benchmarks/memory_breakdown.py --tie --rows gc each recompute+each --label-depth 9   # ViT-S/16, batch 32
    python benchmarks/memory_breakdown.py --model paper:resnet110 --input-size 32 --batch-size 64 --rows gc each

The step, the optimizer and the counting are ``auglocal_fx.measure_memory``'s (its
``_SavedAndGrads``): parameters + optimizer state + the peak over the step of (saved bytes live +
``.grad`` bytes existing). At each new peak this script notes which saved storages and which
gradients make it up. A saved storage is named by the module whose forward saved it first (the
innermost module running, from global forward hooks) and by its shape; the batch is named as
such. The tensors the whole count leaves out (the batch, a boundary output) are listed below
the table with their sizes, for reference: they are not in the sum.
"""

import argparse
import gc
from collections import defaultdict

import torch
from torch import nn

from auglocal_fx import ConversionOptions, to_local
from auglocal_fx import _memory_step as ms
from auglocal_fx._saved_bytes import SavedBytesCounter, storage_bytes

_MIB = float(2 ** 20)


class _Named(ms._SavedAndGrads):
    """``_SavedAndGrads`` that remembers, at its peak, what the saved and gradient bytes were."""

    def __init__(self, params, names, module_names, batch, depth):
        super().__init__(params)
        self.labels = {}
        self.names, self.depth, self.batch_key = names, depth, SavedBytesCounter._key(batch)
        self.snapshot = ({}, {})
        self.stack = []
        count = self.counter._count

        def labelled_count(t):
            # Both the saved tensors and what a checkpoint recomputes pass through ``_count``.
            try:
                key = SavedBytesCounter._key(t)
            except (RuntimeError, NotImplementedError):
                return count(t)
            if key not in self.counter._entries:  # a new storage (an address can be reused after a free)
                where = self.stack[-1] if self.stack else "(outside any module)"
                self.labels[key] = "the batch" if key == self.batch_key else \
                    f"{'.'.join(where.split('.')[:depth])} {tuple(t.shape)} {str(t.dtype)[6:]}"
            return count(t)

        self.counter._count = labelled_count

        def enter(module, args):
            self.stack.append(module_names.get(id(module), type(module).__name__))

        def leave(module, args, output):
            self.stack.pop()  # returns None: a forward hook's return value would replace the output

        self._hooks = [nn.modules.module.register_module_forward_pre_hook(enter),
                       nn.modules.module.register_module_forward_hook(leave)]

    def _check(self):
        if self.counter.live + self.grads > self.peak:
            super()._check()
            saved = defaultdict(lambda: [0, 0])
            for key, (_, nbytes) in self.counter._entries.items():
                entry = saved[self.labels.get(key, "?")]
                entry[0] += nbytes
                entry[1] += 1
            grads = defaultdict(int)
            for name, p in self.names:
                if p.grad is not None:
                    grads[".".join(name.split(".")[:2])] += p.grad.untyped_storage().nbytes()
            self.snapshot = (dict(saved), dict(grads))

    def close(self):
        super().close()
        for h in self._hooks:
            h.remove()


def breakdown(local, method, batch_size, each, depth):
    """One measured step of ``method`` as ``measure_memory`` runs it (SGD, warm-up, fresh gradients).

    Returns:
        ``(param bytes, optimizer bytes, the _Named counter with its snapshot, x, y)``.
    """
    local.train()
    params = list(local.parameters())
    trained = ms._trained_parameters(local, method)
    opt = ms._make_optimizer("sgd", trained)
    ms.run_method_step(local, method, *ms.random_batch(local, 2, torch.device("cpu"), 0))
    opt.step()
    local.zero_grad(set_to_none=True)
    x, y = ms.random_batch(local, batch_size, torch.device("cpu"), 0)
    gc.collect()
    names = {id(m): n for n, m in local.named_modules()}
    whole = _Named(params, list(local.named_parameters()), names, x, depth)
    try:
        with whole.counter:
            ms.run_method_step(local, method, x, y, each, drop=whole.drop)
    finally:
        whole.close()
    param_bytes, opt_bytes = storage_bytes(trained), ms._optimizer_state_bytes(opt)
    local.zero_grad(set_to_none=True)
    return param_bytes, opt_bytes, whole, x, y


def _print(title, param_bytes, opt_bytes, whole, x, boundary):
    """The snapshot at the peak: saved storages by label, largest first, then gradients by module."""
    saved, grads = whole.snapshot
    total = param_bytes + opt_bytes + whole.peak
    print(f"\n== {title}: whole {total / _MIB:.1f} MiB = params {param_bytes / _MIB:.1f} + momentum "
          f"{opt_bytes / _MIB:.1f} + at the peak: saved {sum(v[0] for v in saved.values()) / _MIB:.1f} + grads "
          f"{sum(grads.values()) / _MIB:.1f}")
    for label, (nbytes, count) in sorted(saved.items(), key=lambda kv: -kv[1][0]):
        print(f"  saved  {nbytes / _MIB:8.2f}  {count:3d} x {label}")
    for label, nbytes in sorted(grads.items(), key=lambda kv: -kv[1]):
        print(f"  grad   {nbytes / _MIB:8.2f}  {label}")
    print(f"  not counted: the batch {x.numel() * x.element_size() / _MIB:.2f} MiB"
          + (f", a boundary output {boundary / _MIB:.2f} MiB" if boundary else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="timm:vit_small_patch16_224")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--d", type=int, default=2)
    parser.add_argument("--tie", action="store_true", help="tied copies (aux_tie)")
    parser.add_argument("--rows", nargs="+", default=["gc", "recompute+each"],
                        choices=["gc", "plain", "each", "recompute", "recompute+each"])
    parser.add_argument("--label-depth", type=int, default=3, help="module-name components in a label")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    local = to_local(args.model, d=args.d, input_size=(3, args.input_size, args.input_size),
                     options=ConversionOptions(aux_tie=args.tie))
    print(f"{args.model}, batch {args.batch_size}, d={args.d}, {len(local.blocks)} blocks"
          + (", tied copies" if args.tie else ""))
    # Block 0's detached output, as the trainer holds it between modules (float32).
    boundary = args.batch_size * int(torch.tensor(local.block_shapes[0]).prod()) * 4
    state = {k: v.clone() for k, v in local.state_dict().items()}
    for row in args.rows:
        method = "checkpoint" if row == "gc" else "auglocal"
        local.aux_checkpoint = "recompute" in row
        result = breakdown(local, method, args.batch_size, "each" in row, args.label_depth)
        _print(row, *result[:3], result[3], boundary if method == "auglocal" else 0)
        local.load_state_dict(state)


if __name__ == "__main__":
    main()
