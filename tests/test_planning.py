"""The paper's formulas against the worked examples of docs/method.md."""

import pytest

from auglocal_fx import AugLocalError
from auglocal_fx.planning import (
    num_local_modules,
    plan_aux_nets,
    pyramid_depths,
    repetitive_selection,
    sequential_selection,
    stride_plan,
    uniform_selection,
    validate_options,
)


def test_resnet110_d6_pyramid():
    depths = pyramid_depths(55, d=6, tau=0.5)
    assert depths == [5] * 12 + [4] * 25 + [3] * 12


def test_resnet110_aux_counts():
    assert num_local_modules(55, 2) - 1 == 53
    assert num_local_modules(55, 6) - 1 == 49


def test_pyramid_off_and_k2():
    assert pyramid_depths(55, d=6, pyramid=False) == [5] * 49
    assert pyramid_depths(6, d=5, tau=0.5) == [4]  # K = 2: n_0 = n_max


def test_pyramid_tau_zero_is_constant():
    assert pyramid_depths(20, d=4, tau=0.0) == [3] * 16


def test_uniform_selection():
    assert uniform_selection(0, 5, 55) == [11, 22, 32, 43, 54]
    assert uniform_selection(50, 5, 55) == [51, 52, 53, 54]  # fewer later blocks than n
    assert uniform_selection(3, 1, 10) == [9]  # the last block is always sampled


def test_sequential_and_repetitive():
    assert sequential_selection(2, 3, 10) == [3, 4, 5]
    assert sequential_selection(7, 3, 10) == [8, 9]
    assert repetitive_selection(4, 3, 10) == [4, 4, 4]


def test_stride_plan_carries_reductions():
    # block j at 32 px; copies of blocks at 16, 8, 8: each copy reduces at most 2x.
    assert stride_plan(32, [8, 8]) == [2, 2]
    assert stride_plan(32, [4]) == [2]  # the rest cannot fit
    assert stride_plan(32, [32, 16]) == [1, 2]
    assert stride_plan(15, [8, 4]) == [2, 2]  # ceil-mode sizes still count as 2x


def test_plan_aux_nets_table6():
    """ResNet-110, d = 2: every aux copies the last block with the right reductions."""
    res = [32] * 19 + [16] * 18 + [8] * 18
    plans = plan_aux_nets(res, d=2)
    assert len(plans) == 53
    assert all(p.selected == (54,) for p in plans)
    assert plans[0].strides == (2,)  # 32 -> 8 is 4x, one copy can only do 2x
    assert plans[30].strides == (2,)  # 16 -> 8
    assert plans[40].strides == (1,)  # already at 8
    assert all(p.depth == 2 for p in plans)


@pytest.mark.parametrize("d,tau,selection", [(1, 0.5, "uniform"), (2.5, 0.5, "uniform"),
                                             (2, -0.1, "uniform"), (2, 1.5, "uniform"),
                                             (2, 0.5, "random"), (True, 0.5, "uniform")])
def test_bad_options(d, tau, selection):
    with pytest.raises(AugLocalError):
        validate_options(d, tau, selection)


def test_depth_too_large():
    with pytest.raises(AugLocalError, match="use d <= 9"):
        num_local_modules(10, 10)
