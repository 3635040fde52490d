"""Block boundaries that carry a tuple of tensors: NASNet-like cells reading the two cells before.

The network is :class:`tests._cell_models.CellNet`; its blocks and arities are written out by
hand from its ``forward``. References are the original model (outputs, fvcore's count of it)
and hand-written expectations, never numbers of the code under test.
"""

import pytest
import torch
from torch import fx

from auglocal_fx import AugLocalError, count_flops, to_local
from auglocal_fx.partition import partition_blocks
from auglocal_fx.planning import AuxPlan, match_arity
from auglocal_fx.tracing import SHAPE_KEY, trace_model
from auglocal_fx.tuple_cuts import live_values

from ._cell_models import CLASSES, SIZE, Cell, CellNet
from .test_sweep import batch, check_local

# From CellNet.forward: stem+stem2 -> (s0, s1); cell0 -> (s1, c0); cell1 -> (c0, c1);
# cell2 (reduction) -> c2 alone; transition -> (c2, t); cell3 -> (t, c3); cell4 -> c4.
BLOCKS = [["stem", "stem2"], ["cell0"], ["cell1"], ["cell2"], ["transition"], ["cell3"], ["cell4"]]
ARITIES = [2, 2, 2, 1, 2, 2, 1]


def _quiet_local(model, **kwargs):
    with pytest.warns(UserWarning, match="input adapter|average pooling"):
        return to_local(model, input_size=SIZE, **kwargs)


def _live_names(wide=()):
    """``live_values`` of ``relu(x) * sigmoid(x) + relu(x)``, maps (N, 2) but for the 5-D ``wide``."""
    def f(x):
        a = torch.relu(x)
        b = torch.sigmoid(x)
        return a * b + a

    gm = fx.symbolic_trace(f)
    for node in gm.graph.nodes:
        node.meta[SHAPE_KEY] = torch.Size([1, 2, 3, 4, 5] if node.name in wide else [1, 2])
    order = [n for n in gm.graph.nodes if n.op != "output"]
    return [None if v is None else [n.name for n in v] for v in live_values(order)]


def test_live_values_of_a_small_graph():
    # x is live until sigmoid reads it; a until the last add
    assert _live_names() == [["x"], ["x", "relu"], ["relu", "sigmoid"], ["relu", "mul"], ["add"]]


def test_no_tuple_element_is_wider_than_a_map():
    # The rule of single cuts holds for every element of a tuple: auxiliary networks, adapters
    # and heads take maps, tokens or features (a 5-D element once reached an auxiliary network).
    # The gap after sigmoid carries it (5-D): no boundary; the others as in the test above
    assert _live_names(wide=("sigmoid",)) == [["x"], ["x", "relu"], None, ["relu", "mul"], ["add"]]


def test_cells_are_cut_where_two_tensors_are_live():
    part = partition_blocks(trace_model(CellNet().eval(), SIZE))
    assert part.block_names == BLOCKS
    assert part.head_names == ["fc"]
    assert [part.output_arity(j) for j in range(len(BLOCKS))] == ARITIES
    assert part.output_shapes[0] == ((8, 16, 16), (8, 16, 16))
    assert part.output_shapes[3] == ((16, 8, 8),)
    assert [b.arity for b in part.blocks] == [1] + ARITIES[:-1]


def test_selection_keeps_blocks_of_the_arity_that_reaches_them():
    resolutions = [16, 16, 16, 8, 8, 8, 8]
    # block 0 returns a pair; block 3 takes one (cell1's pair) and returns c2 alone, which
    # block 6 (a pair-taking cell) cannot follow: the nearest block taking one tensor is 4
    plan = match_arity(AuxPlan(0, (3, 6), (2, 1)), ARITIES, resolutions)
    assert plan.selected == (3, 4)
    assert plan.strides == (2, 1)
    # block 3 returns one tensor: block 6 takes a pair, block 4 takes one
    assert match_arity(AuxPlan(3, (6,), (1,)), ARITIES, resolutions).selected == (4,)
    # nothing to change
    same = AuxPlan(1, (6,), (2,))
    assert match_arity(same, ARITIES, resolutions) is same


@pytest.mark.parametrize("d", [2, 3, 4])
def test_cell_network_keeps_every_guarantee(d):
    torch.manual_seed(0)
    model = CellNet()
    local = _quiet_local(model, d=d)
    assert local.block_names == BLOCKS
    check_local(model, local, SIZE, CLASSES, CellNet)


def test_eval_and_train_outputs_equal_the_original():
    torch.manual_seed(0)
    model = CellNet()
    local = _quiet_local(model, d=2)
    x = torch.randn(3, *SIZE)
    model.eval()
    local.eval()
    with torch.no_grad():
        assert torch.equal(local(x), model(x))
    model.train()
    local.train()
    torch.manual_seed(5)
    expected = model(x)
    torch.manual_seed(5)
    assert torch.equal(local.head(_run_blocks(local, x)), expected)


def _run_blocks(local, x):
    h = x
    for block in local.blocks:
        h = block(*h) if isinstance(h, tuple) else block(h)
    return h


def test_no_element_carries_a_gradient_into_an_earlier_block():
    torch.manual_seed(0)
    model = CellNet()
    local = _quiet_local(model, d=2)
    local.train()
    outputs = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for b in local.blocks]
    x, _ = batch(SIZE, num_classes=CLASSES)
    logits, aux_logits = local(x)
    for hook in hooks:
        hook.remove()
    losses = [a.sum() for a in aux_logits] + [logits.sum()]
    K = local.num_local
    checked = 0
    for j in range(K - 1):
        elements = outputs[j] if isinstance(outputs[j], tuple) else (outputs[j],)
        assert len(elements) == ARITIES[j]
        for e, element in enumerate(elements):
            if not element.requires_grad:
                continue  # an element passed through from an earlier, already detached boundary
            for later in losses[j + 1:]:
                (grad,) = torch.autograd.grad(later, element, retain_graph=True, allow_unused=True)
                assert grad is None or not grad.any(), f"block {j} element {e}"
                checked += 1
    assert checked >= K - 1


def test_copies_take_the_elements_their_source_takes():
    torch.manual_seed(0)
    model = CellNet()
    # sequential d=2: aux j copies block j+1, which takes exactly block j's output; with the
    # source's weights the copy is block j+1 itself
    local = to_local(model, d=2, selection="sequential", aux_init="copy", input_size=SIZE)
    local.eval()
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        h = x
        for j, aux in enumerate(local.aux):
            h = local.blocks[j](h)
            copy = aux[0]
            got = copy(*h) if isinstance(h, tuple) else copy(h)
            want = local.blocks[j + 1](h)
            for g, w in zip(got if isinstance(got, tuple) else (got,),
                            want if isinstance(want, tuple) else (want,)):
                assert torch.equal(g, w), f"aux {j}"


def test_heads_of_tuples_pool_each_element():
    torch.manual_seed(0)
    local = _quiet_local(CellNet(), d=2)
    # uniform d=2: aux 0 copies block 6 (cell4), which returns one tensor: a copy of the head;
    # sequential d=2: aux 0 copies block 1 (cell0), which returns a pair: the pooled head
    seq = to_local(CellNet(), d=2, selection="sequential", input_size=SIZE)
    head = seq.aux[0][-1]
    assert type(head).__name__ == "TupleHead"
    # pooled widths: cell0 returns (s1, c0) of 8 and 16 channels
    assert head.tail[0].num_features == 8 + 16
    x = torch.randn(2, *SIZE)
    seq.eval()
    with torch.no_grad():
        assert seq.aux[0](seq.blocks[0](x)).shape == (2, CLASSES)
    assert local.aux[0][-1].fc.out_features == CLASSES


def test_aux_checkpoint_gives_the_same_gradients():
    torch.manual_seed(0)
    model = CellNet()
    local = _quiet_local(model, d=3)
    x, y = batch(SIZE, num_classes=CLASSES)
    grads = []
    for recompute in (False, True):
        local.aux_checkpoint = recompute
        local.zero_grad(set_to_none=True)
        state = {k: v.clone() for k, v in local.state_dict().items()}
        torch.manual_seed(3)
        local.train_step(x, y)
        grads.append([p.grad.clone() for p in local.parameters()])
        local.load_state_dict(state)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_flops_of_the_primary_equal_fvcore_on_the_original():
    from fvcore.nn import FlopCountAnalysis

    model = CellNet().eval()
    local = _quiet_local(model, d=3)
    analysis = FlopCountAnalysis(model, torch.randn(1, *SIZE))
    analysis.unsupported_ops_warnings(False)
    flops = count_flops(local)
    assert flops.primary == analysis.total()
    assert flops.aux_total > 0
    assert flops.blocks[0].output_shape == ((8, 16, 16), (8, 16, 16))


@pytest.mark.parametrize("rule", ["dgl", "predsim", "infopro", "auglocal+infopro"])
def test_other_rules_refuse_tuple_boundaries_in_one_line(rule):
    with pytest.raises(AugLocalError, match="several tensors") as error:
        to_local(CellNet(), d=2, rule=rule, input_size=SIZE)
    assert "\n" not in str(error.value)


def test_cka_and_probes_read_the_newest_stream():
    from auglocal_fx.cka import block_cka

    torch.manual_seed(0)
    local = _quiet_local(CellNet(), d=2)
    x = torch.randn(8, *SIZE)
    y = torch.randint(0, CLASSES, (8,))
    data = torch.utils.data.TensorDataset(x, y)
    result = block_cka(local, local, torch.utils.data.DataLoader(data, batch_size=8))
    # a network compared with itself: CKA 1 at every block, tuples included
    for value in result.values:
        assert value == pytest.approx(1.0, abs=1e-5)


def test_the_pipeline_refuses_tuple_boundaries_in_one_line(tmp_path, monkeypatch):
    from pathlib import Path

    import auglocal_fx._launch
    from auglocal_fx.training import TrainConfig, train

    def no_process_may_start(*args):
        raise AssertionError("a process was started for a run the launcher must refuse")

    monkeypatch.setattr(auglocal_fx._launch, "spawn", no_process_may_start)  # refused before any starts

    spec = str(Path(__file__).with_name("_cell_models.py")) + ":cell_net"
    config = TrainConfig(model=spec, dataset="synthetic", input_size=16, batch_size=8,
                         train_subset=16, test_subset=8, epochs=1, d=2, device="cpu", threads=1,
                         progress=False, pipeline=2, out=str(tmp_path))
    with pytest.raises(AugLocalError, match="several tensors") as error:
        train(config)
    assert "\n" not in str(error.value)


class _NoSingleCut(torch.nn.Module):
    """Two cells reading the image and a convolution of it; a classifier of most parameters.

    Only the input and the last cell's output carry everything, and the one block between
    them holds far less than a third of the parameters: it is split all the same.
    """

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
        self.cell0 = Cell(8, 3)
        self.cell1 = Cell(16, 8)
        self.fc = torch.nn.Sequential(torch.nn.Linear(16, 4096), torch.nn.Linear(4096, CLASSES))

    def forward(self, x):
        a = self.conv(x)
        c0 = self.cell0(a, x)
        c1 = self.cell1(c0, a)
        return self.fc(torch.relu(c1).mean((2, 3)))


def test_a_network_without_single_cuts_is_split_however_small_its_body():
    model = _NoSingleCut().eval()
    body = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("fc"))
    assert body < sum(p.numel() for p in model.parameters()) / 3
    part = partition_blocks(trace_model(model, SIZE))
    assert part.block_names == [["conv"], ["cell0"], ["cell1"]]
    assert [part.output_arity(j) for j in range(3)] == [2, 2, 1]
    local = to_local(model, d=2, input_size=SIZE)
    check_local(model, local, SIZE, CLASSES, _NoSingleCut)


class _Add(torch.nn.Module):
    def forward(self, a, b):
        return a + b


class _Pair(torch.nn.Module):
    """Two convolutions of one input, added by a child module: the unit's own code merges nothing,
    but it is still one unit."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.m1 = torch.nn.Conv2d(width, width, 3, padding=1)
        self.m2 = torch.nn.Conv2d(width, width, 3, padding=1)
        self.add = _Add()

    def forward(self, x):
        a = torch.relu(self.m1(x))
        return self.add(a, self.m2(x))


class _Pairs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU())
        self.pairs = torch.nn.Sequential(_Pair(), _Pair())
        self.fc = torch.nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.fc(self.pairs(self.stem(x)).mean((2, 3)))


def test_a_repeated_unit_is_not_cut_inside_its_own_code():
    part = partition_blocks(trace_model(_Pairs().eval(), SIZE))
    # each pair holds ~49% of the parameters, yet no gap inside a pair's own forward is a cut
    assert part.block_names == [["stem"], ["pairs.0"], ["pairs.1"]]
    assert [part.output_arity(j) for j in range(3)] == [1, 1, 1]


class _QueryBlock(torch.nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.conv = torch.nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x, query):
        return x + torch.relu(self.conv(x)) * query


class _QueryStage(torch.nn.Module):
    """GCViT's stage: its own code computes a query beside the features and hands both to each
    block of its list; the query's convolutions and the first block are over a third together."""

    def __init__(self, width: int = 16, depth: int = 3):
        super().__init__()
        self.query = torch.nn.Sequential(torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU(),
                                         torch.nn.Conv2d(width, width, 3, padding=1))
        self.blocks = torch.nn.ModuleList(_QueryBlock(width) for _ in range(depth))

    def forward(self, x):
        query = torch.sigmoid(self.query(x))  # in the stage's own code, as GCViT's global norm
        for block in self.blocks:
            x = block(x, query)
        return x


class _QueryNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU())
        self.stages = torch.nn.Sequential(_QueryStage(), _QueryStage())
        self.fc = torch.nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.fc(self.stages(self.stem(x)).mean((2, 3)))


def test_a_stage_is_cut_where_its_code_enters_its_list_of_blocks():
    model = _QueryNet().eval()
    part = partition_blocks(trace_model(model, SIZE))
    # each stage holds ~49% of the parameters: cut before its first block (the stage's own code
    # hands (x, query) to it) and between its blocks, as a residual unit never is (above)
    stage = lambda i: [[f"stages.{i}.query"]] + [[f"stages.{i}.blocks.{k}"] for k in range(3)]  # noqa: E731
    assert part.block_names == [["stem"]] + stage(0) + stage(1)
    assert [part.output_arity(j) for j in range(len(part.block_names))] == [1, 2, 2, 2, 1, 2, 2, 2, 1]
    local = to_local(model, d=2, input_size=SIZE)
    check_local(model, local, SIZE, CLASSES, _QueryNet)


def test_the_budget_plans_copies_by_arity_as_the_conversion_does():
    from auglocal_fx.budget import solve_budget

    with pytest.warns(UserWarning):
        choice = solve_budget(CellNet(), "100x", max_d=4, tau_step=0.5, input_size=SIZE)
        local = to_local(CellNet(), d=choice.d, tau=choice.tau, input_size=SIZE)
    assert choice.d == 4
    assert choice.flops == count_flops(local).total


def test_a_linear_piece_of_a_split_block_joins_the_next():
    model = _NoSingleCut().eval()
    model.conv = torch.nn.Conv2d(3, 8, 3, padding=1)  # no activation: a linear map
    part = partition_blocks(trace_model(model, SIZE))
    assert part.block_names == [["conv", "cell0"], ["cell1"]]
