"""Memory measurement: the saved-bytes counter, and AugLocal's peak against BP's."""

import pytest
import torch
from torch import nn

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
