"""FLOPs budgeting: parsing a budget, and the largest ``d``, then smallest ``tau``, that fits it."""

import os

import pytest
import torch
from torch import nn

from auglocal_fx import AugLocalError, to_local
from auglocal_fx.budget import parse_budget, solve_budget
from auglocal_fx.flops import count_flops

TINY = os.path.join(os.path.dirname(__file__), "_tiny_models.py") + ":tiny_cnn"


@pytest.mark.parametrize("text, expected", [
    ("2.5x", ("ratio", 2.5)),
    ("3X", ("ratio", 3.0)),
    ("1.1G", ("flops", 1.1e9)),
    ("800M", ("flops", 800e6)),
    ("1.5e9", ("flops", 1.5e9)),
    ("250k", ("flops", 250e3)),
    (1100000000, ("flops", 1.1e9)),
])
def test_parse_budget(text, expected):
    kind, value = parse_budget(text)
    assert kind == expected[0] and value == pytest.approx(expected[1])


@pytest.mark.parametrize("text", ["", "abc", "2.5y", "-1G", "0x", "1.1 GB", "x2", 0, True])
def test_parse_budget_rejects(text):
    with pytest.raises(AugLocalError, match="budget"):
        parse_budget(text)


def test_solve_budget_picks_largest_d_then_smallest_tau():
    threshold = count_flops(to_local("paper:resnet32", d=4, tau=0.5)).total
    choice = solve_budget("paper:resnet32", threshold)
    assert choice.flops <= choice.budget == threshold
    assert choice.d >= 4
    for d, tau, total in choice.tried:
        if d > choice.d or (d == choice.d and tau < choice.tau):
            assert total > threshold, (d, tau, total)
    assert f"d={choice.d}" in choice.reason and "1 multiply-add = 1 FLOP" in choice.reason
    # The solver's count (one trace, aux nets synthesized per plan) is to_local's count.
    exact = count_flops(to_local("paper:resnet32", d=choice.d, tau=choice.tau)).total
    assert exact == choice.flops


def test_solve_budget_traces_each_distinct_module_once(monkeypatch):
    # One cache for the whole search: no architecture is traced twice on one input shape, and
    # the chosen network, counted afterwards with the search's cache, traces nothing new.
    from auglocal_fx._module_flops import _arch_key
    from auglocal_fx.flops import FlopCache
    from tests.test_flops import _count_traces

    traced = _count_traces(monkeypatch)
    cache = FlopCache()
    choice = solve_budget("paper:resnet32", "3x", cache=cache)
    keys = [(_arch_key(module), shape) for module, shape in traced]
    assert len(choice.tried) > 1 and len(keys) == len(set(keys))
    before = len(traced)
    local = to_local("paper:resnet32", d=choice.d, tau=choice.tau)
    assert count_flops(local, cache).total == choice.flops
    assert len(traced) == before


def test_solve_budget_large_budget_gives_max_depth_constant():
    choice = solve_budget(TINY, "100x", input_size=(3, 16, 16))
    assert (choice.d, choice.tau) == (3, 0.0)  # 4 blocks: d <= L - 1


def test_solve_budget_too_small():
    with pytest.raises(AugLocalError, match="too small"):
        solve_budget(TINY, "1.0x", input_size=(3, 16, 16))


class _WideLast(nn.Module):
    """Early blocks at full resolution and a very wide last block: for the first auxiliary
    networks, two copied blocks (the first one reducing) cost less than one."""

    def __init__(self):
        super().__init__()
        widths = [(3, 8, 1), (8, 8, 1), (8, 8, 1), (8, 16, 2), (16, 16, 1), (16, 16, 1), (16, 256, 2)]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, s, 1) for a, b, s in widths)
        self.fc = nn.Linear(256, 10)

    def forward(self, x):
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.fc(x.mean((2, 3)))


def test_solve_budget_does_not_assume_tau_1_is_cheapest():
    model = _WideLast()
    size = (3, 32, 32)
    at = {tau: count_flops(to_local(model, d=3, tau=tau, input_size=size)).total for tau in (0.0, 1.0)}
    assert at[0.0] < at[1.0]  # the premise: here the pyramid makes d=3 dearer
    budget = (at[0.0] + at[1.0]) // 2
    choice = solve_budget(model, budget, max_d=3, input_size=size)
    assert choice.d == 3 and choice.flops == at[0.0] <= budget
