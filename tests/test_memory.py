"""Memory measurement: the saved-bytes counter, and AugLocal's peak against BP's."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tests._tiny_models import TinyCNN
from auglocal_fx import AugLocalError, to_local
from auglocal_fx.memory import SavedBytesCounter, measure_memory, measure_step

SIZE = (3, 16, 16)


def _alone(module, h, params):
    with SavedBytesCounter(exclude=params) as counter:
        module(h.detach())
    return counter.peak


def test_counter_counts_each_storage_once_and_frees():
    lin = nn.Linear(64, 64)
    x = torch.randn(8, 64)
    with SavedBytesCounter(exclude=list(lin.parameters())) as counter:
        h = torch.relu(lin(x))      # linear saves x; relu saves its output
        h.relu_().sum().backward()  # in-place relu saves the same storage again
    assert counter.peak == 2 * x.numel() * 4
    assert counter.live == 0


def test_counter_excludes_parameters():
    lin = nn.Linear(4, 4)
    with SavedBytesCounter(exclude=list(lin.parameters())) as counter:
        lin(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert counter.peak == 2 * 4 * 4  # only the input


@pytest.mark.parametrize("reentrant", [True, False])
def test_counter_counts_what_a_checkpoint_recomputes(reentrant):
    # The non-reentrant checkpoint (aux_checkpoint's) recomputes under its own saved-tensor
    # hooks; its recomputed tensors are held in backward all the same and must be counted.
    net = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 8))
    x = torch.randn(16, 32, requires_grad=True)
    with SavedBytesCounter(exclude=list(net.parameters())) as counter:
        y = checkpoint(net, x, use_reentrant=reentrant)
        after_forward = counter.live
        y.sum().backward()
    n = 16 * 4  # rows x bytes per float
    assert after_forward == n * 32  # the input alone
    # In backward: the input (saved by linear 1), GELU's input and linear 2's input, at once.
    assert counter.peak == n * (32 + 48 + 48)
    assert counter.live == 0


def test_auglocal_peak_is_one_local_module_and_bp_is_the_sum():
    torch.manual_seed(0)
    report = measure_memory(TinyCNN(depth=8, downsample=False), d=2, batch_size=2, input_size=SIZE, rss=False)
    bp, gc, al = report.row("bp"), report.row("checkpoint"), report.row("auglocal")

    # BP holds every block's saved tensors at once: the sum of the blocks run alone, minus the
    # block outputs that two neighbouring blocks both save (the output of j is the input of j+1).
    torch.manual_seed(0)
    local = to_local(TinyCNN(depth=8, downsample=False), d=2, input_size=SIZE)
    params = list(local.parameters())
    h = torch.randn(2, *SIZE)
    total, shared = 0, 0
    for j, block in enumerate(local.blocks):
        total += _alone(block, h, params)
        h = block(h.detach()).detach()
        if j < len(local.blocks) - 1:
            shared += h.numel() * h.element_size()
    total += _alone(local.head, h, params)
    assert 0.97 * (total - shared) <= bp.saved_peak <= 1.03 * (total - shared)

    # AugLocal holds one local module at a time: the lower bound plus at most a small margin.
    assert al.saved_peak <= 1.02 * al.lower_bound + 1024
    # Recomputing each piece on its own lowers the bound: one piece's activations at a time.
    torch.manual_seed(0)
    again = measure_memory(TinyCNN(depth=8, downsample=False), methods=("auglocal",), d=2, batch_size=2,
                           input_size=SIZE, rss=False, aux_checkpoint=True).row("auglocal")
    assert again.lower_bound < al.lower_bound
    assert again.saved_peak <= 1.02 * again.lower_bound + 1024
    assert al.saved_peak < 0.4 * bp.saved_peak  # 8 equal blocks vs block + aux copy
    assert gc.saved_peak < bp.saved_peak
    assert "saved_tensors_hooks" in str(report) and "lower bd" in str(report)


def test_rss_in_fresh_subprocess():
    # The model object travels to the subprocess pickled (its class must be importable there).
    # A batch large enough (2 MiB per activation) that the step cannot live in the heap left
    # over from the warm-up step.
    model = TinyCNN(depth=8, downsample=False)
    report = measure_memory(model, methods=("bp", "auglocal"), batch_size=64, input_size=(3, 32, 32))
    bp, al = report.row("bp"), report.row("auglocal")
    assert bp.rss_peak > 0.5 * bp.saved_peak and al.rss_peak < bp.rss_peak
    assert "VmHWM" in str(report)


def test_bad_arguments():
    with pytest.raises(AugLocalError, match="choose from"):
        measure_memory(TinyCNN(), methods=("adam",), input_size=SIZE)
    with pytest.raises(AugLocalError, match="device"):
        measure_memory(TinyCNN(), device="tpu", input_size=SIZE)


def test_measure_step_on_a_plain_module():
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    result = measure_step(lambda: lin(x).sum().backward(), exclude=list(lin.parameters()))
    assert result.peak_bytes == x.numel() * 4 and "saved_tensors_hooks" in result.how


def _nbytes(params):
    return sum(p.numel() * p.element_size() for p in params)


def test_whole_count_adds_parameters_gradients_and_optimizer_state():
    torch.manual_seed(0)
    model = TinyCNN(depth=4, downsample=False)
    primary = _nbytes(model.parameters())  # the original model's parameters, counted by hand
    local = to_local(copy.deepcopy(model), d=2, input_size=SIZE)
    aux = _nbytes(local.aux.parameters())
    report = measure_memory(model, d=2, batch_size=2, input_size=SIZE, rss=False)
    bp, gc, al = report.row("bp"), report.row("checkpoint"), report.row("auglocal")

    # BP and checkpointing train the primary network only; SGD momentum holds one buffer each.
    for row in (bp, gc):
        assert row.param_bytes == primary and row.optimizer_bytes == primary
    assert al.param_bytes == primary + aux and al.optimizer_bytes == primary + aux
    for row in (bp, gc, al):  # the gradients at the peak are some of the parameters' at most
        base = row.param_bytes + row.optimizer_bytes
        assert base + row.saved_peak <= row.whole_peak <= base + row.saved_peak + row.param_bytes
        assert row.whole_peak - base - row.grad_bytes <= row.saved_peak
    # BP's peak is the end of the forward, before any gradient exists (they are None until then).
    assert bp.grad_bytes < primary / 2
    # AugLocal's output module runs while every earlier local module's gradients are held.
    k = local.num_local
    earlier = _nbytes(p for j in range(k - 1) for p in local.block_parameters(j))
    h = torch.randn(2, *SIZE)
    for block in local.blocks[:k - 1]:
        h = block(h).detach()
    out_module = nn.Sequential(*local.blocks[k - 1:], local.head)
    floor = al.param_bytes + al.optimizer_bytes + earlier + _alone(out_module, h, list(local.parameters()))
    assert al.whole_peak >= floor and al.grad_bytes >= earlier
    assert "whole MiB" in str(report) and "optimizer state" in str(report)


def test_adamw_state_is_two_buffers_and_a_step_per_parameter():
    model = TinyCNN(depth=4, downsample=False)
    params = list(model.parameters())
    report = measure_memory(model, methods=("bp",), batch_size=2, input_size=SIZE, rss=False, optimizer="adamw")
    step_bytes = len(params) * torch.tensor(0.0).element_size()  # AdamW's per-parameter step count
    assert report.row("bp").optimizer_bytes == 2 * _nbytes(params) + step_bytes
    with pytest.raises(AugLocalError, match="unknown optimizer"):
        measure_memory(model, optimizer="lion", input_size=SIZE)


def test_recompute_holds_one_piece_of_a_local_module_at_a_time():
    # aux_checkpoint recomputes block 0 in backward, after its auxiliary network's backward: the
    # forward keeps the block's input (the batch) and the auxiliary network's activations, and
    # backward holds one piece's activations at a time. Without it, both are held together.
    torch.manual_seed(0)
    local = to_local(TinyCNN(depth=4, downsample=False), d=2, input_size=SIZE)
    params = list(local.parameters())
    x, y = torch.randn(2, *SIZE), torch.randint(0, 10, (2,))
    out = local.blocks[0](x)
    block, aux = _alone(local.blocks[0], x, params), _alone(local.aux[0], out, params)
    x_bytes, out_bytes = x.numel() * 4, out.numel() * 4  # float32, counted by hand
    loss_bytes = 2 * 10 * 4 + 2 * 8 + 4  # cross-entropy keeps the logits, the targets and a scalar
    peaks, after_forward = {}, {}
    for flag in (False, True):
        local.aux_checkpoint = flag
        with SavedBytesCounter(exclude=params) as counter:
            loss = next(local.local_losses(x, y))  # local module 0: block 0 + aux 0
            after_forward[flag] = counter.live
            loss.backward()
        peaks[flag] = counter.peak
        assert counter.live == 0  # everything is let go after backward (BatchNorm's buffers too)
    assert after_forward[True] == x_bytes + aux + loss_bytes
    # Both pieces together (block 0's output, saved by both, once) and the loss's tensors.
    assert peaks[False] == after_forward[False] == block + aux - out_bytes + loss_bytes
    assert peaks[True] <= max(block, aux) + x_bytes + out_bytes + loss_bytes < peaks[False]

    # The output module: block K-1 and blocks K.., each recomputed on its own, then the head.
    k = local.num_local
    for flag in (False, True):
        local.aux_checkpoint = flag
        losses = local.local_losses(x, y)
        for _ in range(k - 1):
            next(losses).backward()
        with SavedBytesCounter(exclude=params) as counter:
            next(losses).backward()
        peaks[flag] = counter.peak
    assert peaks[True] < peaks[False]


def test_aux_checkpoint_and_optimizer_errors_are_ours():
    with pytest.raises(AugLocalError, match="aux_checkpoint must be"):
        measure_memory(TinyCNN(), aux_checkpoint=1, input_size=SIZE)
    with pytest.raises(AugLocalError, match="aux_checkpoint must be"):
        to_local(TinyCNN(), aux_checkpoint="yes", input_size=SIZE)


def test_step_each_module_holds_one_modules_gradients_at_the_peak():
    torch.manual_seed(0)
    model = TinyCNN(depth=4, downsample=False)
    local = to_local(copy.deepcopy(model), d=2, input_size=SIZE)
    k = local.num_local
    modules = [list(local.block_parameters(j)) for j in range(k - 1)] + [list(local.output_module_parameters())]
    largest = max(_nbytes(m) for m in modules)  # counted by hand from the modules' parameters
    report = measure_memory(model, methods=("auglocal",), d=2, batch_size=2, input_size=SIZE, rss=False,
                            step_each_module=(False, True))
    at_end, each = report.row("auglocal", step_each_module=False), report.row("auglocal", step_each_module=True)
    assert each.label == "auglocal d=2 +step each" and at_end.label == "auglocal d=2"
    assert each.grad_bytes <= largest < at_end.grad_bytes
    # The same step otherwise: saved bytes, parameters and optimizer state are equal.
    assert (each.saved_peak, each.param_bytes, each.optimizer_bytes) == \
        (at_end.saved_peak, at_end.param_bytes, at_end.optimizer_bytes)
    assert each.whole_peak < at_end.whole_peak
    # The output module runs with no earlier module's gradients left: its own saved bytes plus
    # at most its own gradients.
    base = each.param_bytes + each.optimizer_bytes
    assert each.whole_peak <= base + each.saved_peak + largest


@pytest.mark.parametrize("recompute", [False, True])
def test_the_breakdown_names_every_byte_of_the_peak(recompute):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from memory_breakdown import breakdown

    torch.manual_seed(0)
    local = to_local(TinyCNN(depth=4, downsample=False), d=2, input_size=SIZE, aux_checkpoint=recompute)
    params, opt, whole, x, _ = breakdown(local, "auglocal", 2, True, 9)
    saved, grads = whole.snapshot
    # Every storage at the peak has a name (recomputed ones too); they add up to the counted peak.
    assert "?" not in saved and "the batch" in whole.labels.values()
    assert sum(v[0] for v in saved.values()) + sum(grads.values()) == whole.peak
    row = measure_memory(local, methods=("auglocal",), batch_size=2, rss=False, step_each_module=True,
                         aux_checkpoint=recompute).row("auglocal")
    assert params + opt + whole.peak == row.whole_peak
