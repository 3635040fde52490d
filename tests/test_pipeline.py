"""Pipelined local training: stage balancing, exactness against the sequential step, resume,
errors. The pipeline runs are spawned gloo processes on the CPU, one thread each."""

from pathlib import Path

import pytest
import torch

from auglocal_fx import AugLocalError, to_local
from auglocal_fx._distributed import spawn
from auglocal_fx._pipeline import balance_stages, flop_costs, measure_module_times
from auglocal_fx.flops import count_flops
from auglocal_fx.training import TrainConfig, train

# Module fixtures (two_workers: a spawned pipeline run) are built once per process: under
# `pytest -n`, these tests stay on one worker.
pytestmark = pytest.mark.xdist_group("pipeline")

TINY = str(Path(__file__).with_name("_tiny_models.py")) + ":tiny_cnn"
TINY_NOBN = str(Path(__file__).with_name("_tiny_models.py")) + ":tiny_nobn"
FAILING = str(Path(__file__).with_name("_tiny_models.py")) + ":tiny_failing"
SLOW = str(Path(__file__).with_name("_tiny_models.py")) + ":tiny_slow"
LOGGED = str(Path(__file__).with_name("_tiny_models.py")) + ":tiny_logged"
NUM_LOCAL = 3  # local modules of TINY at d=2 (checked below)

# Batch norm and augmentation: exactness must hold for both (and for a rule with a second loss,
# InfoPro, whose images travel to later workers: test_infopro_images_reach_later_workers).
COMMON = dict(model=TINY, dataset="synthetic", input_size=16, batch_size=8, train_subset=32, test_subset=8,
              epochs=2, warmup_epochs=1, lr=0.2, d=2, device="cpu", threads=1, progress=False)


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_weights(a, b):
    a, b = _weights(a), _weights(b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _largest_stage(costs, ranges):
    return max(sum(costs[a:b]) for a, b in ranges)


def test_balance_stages_is_the_best_contiguous_split():
    costs = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    ranges = balance_stages(costs, 3)
    assert ranges == [(0, 5), (5, 7), (7, 9)]  # 15, 13, 17
    assert [r[0] for r in ranges[1:]] == [r[1] for r in ranges[:-1]]
    # Every other split into 3 contiguous ranges has a larger or equal largest stage.
    best = min(_largest_stage(costs, [(0, i), (i, j), (j, 9)]) for i in range(1, 8) for j in range(i + 1, 9))
    assert _largest_stage(costs, ranges) == best
    assert balance_stages([5.0], 1) == [(0, 1)]
    assert balance_stages([1, 1, 1], 3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(AugLocalError, match="cannot split 3 local modules into 4"):
        balance_stages([1, 1, 1], 4)


def test_flop_costs_add_up_to_the_network():
    local = to_local(TINY, d=2, input_size=(3, 16, 16))
    costs = flop_costs(local)
    assert len(costs) == local.num_local == NUM_LOCAL
    assert sum(costs) == count_flops(local).total


def test_measuring_module_times_leaves_the_run_untouched():
    local = to_local(TINY, d=2, input_size=(3, 16, 16))
    before = {k: v.clone() for k, v in local.state_dict().items()}
    rng = torch.get_rng_state()
    times = measure_module_times(local, 4, 10, torch.device("cpu"), repeats=1)
    assert len(times) == local.num_local and all(t > 0 for t in times)
    assert all(torch.equal(before[k], v) for k, v in local.state_dict().items())  # BN statistics too
    assert all(p.grad is None for p in local.parameters())
    assert torch.equal(rng, torch.get_rng_state())


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    out = tmp_path_factory.mktemp("sequential")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = train(TrainConfig(out=str(out), **COMMON))  # threads=1, as every worker
        assert torch.get_num_threads() == 2  # the caller's thread count is left as it was
    finally:
        torch.set_num_threads(threads)
    return result


def _check_pipeline_record(result, stages):
    pipe = result.history[-1]["pipeline"]
    assert pipe["stages"] == stages and len(pipe["busy"]) == stages
    ranges = pipe["modules"]
    assert ranges[0][0] == 0 and ranges[-1][1] == NUM_LOCAL
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:]))


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """One run of two workers (the model logs each process that builds it), its folder, the
    processes that built the model, and whether the caller's random state was left as it was."""
    out = tmp_path_factory.mktemp("two_workers")
    log = out / "built.txt"
    rng = torch.get_rng_state()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUGLOCAL_TEST_BUILD_LOG", str(log))
        result = train(TrainConfig(out=str(out / "run"), pipeline=2, **{**COMMON, "model": LOGGED}))
    return result, out / "run", log.read_text().splitlines(), torch.equal(rng, torch.get_rng_state())


def test_two_workers_give_the_weights_of_the_sequential_schedule(two_workers, sequential):
    result, out, _, _ = two_workers
    _assert_same_weights(sequential.model_path, result.model_path)
    for mine, theirs in zip(result.history, sequential.history):
        assert mine["local_losses"] == theirs["local_losses"] and mine["train_loss"] == theirs["train_loss"]
        assert mine["test_acc"] == theirs["test_acc"] and mine["aux_acc"] == theirs["aux_acc"]
    _check_pipeline_record(result, 2)
    parts = sorted(p.name for p in out.glob("last.stage*.pt"))
    assert parts == [f"last.stage{k}-of-2.step8.pt" for k in range(2)]  # older parts deleted


def test_the_model_is_converted_once_for_all_workers(two_workers):
    # The launching process converts; the workers rebuild its network (no conversion creates the
    # model again), and the weights are still the sequential run's (the test above: the same seed
    # drew them).
    _, _, built_by, rng_kept = two_workers
    assert built_by == ["parent"]
    assert rng_kept  # converting for the workers drew nothing of the caller's


def test_data_parallel_replicas_are_handed_the_launchers_network(tmp_path, monkeypatch):
    # nproc=2 without a pipeline: the replicas get the network converted once by the launching
    # process too (tests/test_training.py checks that two replicas equal one process).
    log = tmp_path / "built.txt"
    monkeypatch.setenv("AUGLOCAL_TEST_BUILD_LOG", str(log))
    train(TrainConfig(out=str(tmp_path / "run"), nproc=2, **{**COMMON, "model": LOGGED, "max_steps": 2}))
    assert log.read_text().splitlines() == ["parent"]


def test_infopro_images_reach_later_workers(tmp_path):
    # InfoPro trains all 4 blocks of TINY but the last locally, each reconstructing the images:
    # the second worker's decoders need the images the first worker read.
    common = {**COMMON, "rule": "infopro", "epochs": 1, "max_steps": 2}
    one = train(TrainConfig(out=str(tmp_path / "one"), **common))
    two = train(TrainConfig(out=str(tmp_path / "two"), pipeline=2, pipeline_balance="flops", **common))
    start = two.history[-1]["pipeline"]["modules"][1][0]
    assert 0 < start < 3  # the second worker has locally trained blocks (K = 4)
    _assert_same_weights(one.model_path, two.model_path)
    assert two.history[-1]["local_losses"] == one.history[-1]["local_losses"]


def test_three_workers_stopped_and_resumed_give_the_same_weights(tmp_path, sequential):
    config = TrainConfig(out=str(tmp_path), pipeline=3, pipeline_balance="flops", **COMMON)
    train(config, max_steps=5)  # stops in the middle of epoch 2
    manifest = torch.load(tmp_path / "last.pt", weights_only=True)
    assert manifest["global_step"] == 5 and manifest["pipeline"]["stages"] == 3
    assert manifest["pipeline"]["parts"] == [f"last.stage{k}-of-3.step5.pt" for k in range(3)]
    result = train(config, resume=True)
    _assert_same_weights(sequential.model_path, result.model_path)
    _check_pipeline_record(result, 3)
    with pytest.raises(AugLocalError, match="resume it with --pipeline 3"):
        train(TrainConfig(out=str(tmp_path), **COMMON), resume=True)


def _no_process_may_start(*args):
    raise AssertionError("a process was started for a run the launcher must refuse")


def test_pipeline_errors_are_one_line(tmp_path, monkeypatch):
    import auglocal_fx._launch

    with monkeypatch.context() as patch:  # refused by the launcher, before any worker starts
        patch.setattr(auglocal_fx._launch, "spawn", _no_process_may_start)
        with pytest.raises(AugLocalError, match=f"more than the {NUM_LOCAL} local modules"):
            train(TrainConfig(out=str(tmp_path / "many"), pipeline=NUM_LOCAL + 1, **{**COMMON, "epochs": 1}))
    with pytest.raises(AugLocalError, match="needs local learning"):
        train(TrainConfig(out=str(tmp_path / "bp"), pipeline=2, method="bp", **COMMON))
    # A worker that dies stops the others, and the message names it.
    monkeypatch.setenv("AUGLOCAL_TEST_FAIL_RANK", "1")
    with pytest.raises(AugLocalError, match="pipeline worker 1"):
        train(TrainConfig(out=str(tmp_path / "dies"), pipeline=2, **{**COMMON, "model": FAILING}))


def test_training_time_covers_the_last_worker(tmp_path, monkeypatch):
    # The last worker sleeps in its steps; the first finishes its own steps a step earlier.
    # samples/s (benchmarks/pipeline.py) is steps x batch / train_seconds, so train_seconds must
    # run to the end of the last worker, whose sleeps alone take (sleeps x SLEEP_SECONDS).
    from tests._tiny_models import SLEEP_SECONDS

    log = tmp_path / "sleeps.txt"
    monkeypatch.setenv("AUGLOCAL_TEST_SLOW_RANK", "1")
    monkeypatch.setenv("AUGLOCAL_TEST_SLOW_LOG", str(log))
    config = {**COMMON, "model": SLOW, "epochs": 1, "warmup_epochs": 0, "train_subset": 16}
    record = train(TrainConfig(out=str(tmp_path / "run"), pipeline=2, **config)).history[-1]
    sleeps = len(log.read_text().splitlines())
    assert record["step"] == 2 and sleeps >= 2
    assert record["train_seconds"] >= sleeps * SLEEP_SECONDS


def test_pipelines_compose_with_data_parallel_replicas(tmp_path):
    # Two replicas of a two-worker pipeline (4 processes) against one process on the whole batch.
    # Batch-norm-free model, no augmentation and d=3 (no BatchNorm1d in the auxiliary heads): with
    # batch norm each replica would normalise its half-batch, which legitimately differs.
    common = {**COMMON, "model": TINY_NOBN, "augment": False, "d": 3, "epochs": 1, "max_steps": 3}
    one = train(TrainConfig(out=str(tmp_path / "one"), **common))
    four = train(TrainConfig(out=str(tmp_path / "four"), pipeline=2, nproc=2, **common))
    assert four.history[-1]["pipeline"]["replicas"] == 2 and len(four.history[-1]["pipeline"]["busy"]) == 4
    a, b = _weights(one.model_path), _weights(four.model_path)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def _check_settings_worker(settings_by_rank):
    import torch.distributed as dist

    from auglocal_fx._distributed import check_same_settings, init_distributed

    rank, _, _ = init_distributed(wants_cuda=False)
    try:
        check_same_settings(settings_by_rank[rank])
    finally:
        dist.destroy_process_group()


def test_processes_started_with_other_settings_are_refused():
    # torchrun starts every process from its own command line: a different batch size or K on
    # one of them must stop the run with one line, not deadlock it.
    with pytest.raises(AugLocalError, match="process 1 was started with batch_size=64, process 0 with 128"):
        spawn(2, _check_settings_worker, [{"pipeline": 2, "batch_size": 128}, {"pipeline": 2, "batch_size": 64}])


def test_workers_with_adamw_a_per_update_cosine_and_mixup_match_the_sequential_run(tmp_path):
    """Each worker's own AdamW and schedule over its own modules; the first worker mixes the
    batch and the soft targets travel: the weights are the sequential run's."""
    common = {**COMMON, "opt": "adamw", "lr": 1e-3, "weight_decay": 0.05, "sched": "cosine",
              "sched_on_updates": True, "mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1, "epochs": 1}
    one = train(TrainConfig(out=str(tmp_path / "one"), **common))
    two = train(TrainConfig(out=str(tmp_path / "two"), pipeline=2, **common))
    _assert_same_weights(one.model_path, two.model_path)
    assert one.history[-1]["local_losses"] == two.history[-1]["local_losses"]


def test_time_balance_measures_one_pass_on_the_cpu(monkeypatch):
    # Every pass is a whole training step all workers wait for: one is enough for proportions.
    local = to_local(TINY, d=2, input_size=(3, 16, 16))
    passes = []
    losses = type(local).module_losses

    def counting(self, *args, **kwargs):
        passes.append(1)
        return losses(self, *args, **kwargs)

    monkeypatch.setattr(type(local), "module_losses", counting)
    measure_module_times(local, 4, 10, torch.device("cpu"))
    assert len(passes) == 1
    measure_module_times(local, 4, 10, torch.device("cpu"), repeats=2, warmup=True)
    assert len(passes) == 4
