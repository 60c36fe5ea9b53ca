"""Observer statistics under torch.distributed: two real CPU ranks on gloo.

The module spawns two processes once (see ``distributed_fixtures/ddp_ranks.py``).
They join a gloo process group on 127.0.0.1 and train the same QAT model
under DistributedDataParallel. Rank 0 feeds inputs in [0, 1] and rank 1
inputs in [0, 8]. Every test then reads what the ranks saved.
"""

from __future__ import annotations

import copy
import pickle
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import qatcore

pytest.importorskip("qatcore_conv")
pytest.importorskip("qatcore_observers")
pytest.importorskip("qatcore_x86")

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("needs torch.distributed with the gloo backend", allow_module_level=True)

FIXTURES = Path(__file__).parent / "distributed_fixtures"
SPAWN_TIMEOUT_S = 120
# Fake quantizers of the model: its own input fake quantizer, the first
# conv's input fake quantizer, then weight and output of each conv. The body
# is swapped on its own, so swap_modules gives its first conv an input quantizer.
FAKE_QUANTIZERS = 6
INPUT_FAKE_QUANT = "0"
QAT_INPUT_FAKE_QUANT = "1.0.input_fake_quant"
# Both see the model's input range, the second after the first quantized it.
INPUT_FAKE_QUANTS = (INPUT_FAKE_QUANT, QAT_INPUT_FAKE_QUANT)


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _spawn_ranks(run_rank: Any, world_size: int, output_dir: Path) -> None:
    """Run ``run_rank`` on every rank; raise if a rank fails or the ranks outlive the timeout."""
    context = torch.multiprocessing.spawn(
        run_rank,
        args=(_free_loopback_port(), str(output_dir)),
        nprocs=world_size,
        join=False,
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the {world_size} ranks did not finish within {SPAWN_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Import the rank module with its folder on ``sys.path``, as the spawned ranks import it."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.syspath_prepend(str(FIXTURES))
        import ddp_ranks

        yield ddp_ranks


@pytest.fixture(scope="module")
def rank_results(ddp_ranks: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run every scenario on two ranks once; return the output folder and each rank's results."""
    output_dir = tmp_path_factory.mktemp("ddp")
    _spawn_ranks(ddp_ranks.run_rank, ddp_ranks.WORLD_SIZE, output_dir)

    ranks = [
        torch.load(output_dir / f"rank{rank}.pt", weights_only=True)
        for rank in range(ddp_ranks.WORLD_SIZE)
    ]
    return {"output_dir": output_dir, "ranks": ranks}


def _observers(rank_results: dict[str, Any], run: str) -> list[dict[str, torch.Tensor]]:
    return [rank[run]["observers"] for rank in rank_results["ranks"]]


def _assert_ranks_equal(states: list[dict[str, torch.Tensor]]) -> None:
    first, second = states
    assert sorted(first) == sorted(second)
    for key in first:
        assert torch.equal(first[key], second[key]), (
            f"{key} differs between the ranks: {first[key]} and {second[key]}"
        )


@pytest.mark.parametrize("run", ["synced", "synced_without_buffer_broadcast", "fully_sharded"])
def test_sync_gives_every_rank_same_observers(rank_results: dict[str, Any], run: str) -> None:
    states = _observers(rank_results, run)

    scales = [key for key in states[0] if key.endswith(".scale")]
    assert len(scales) == FAKE_QUANTIZERS
    assert f"{QAT_INPUT_FAKE_QUANT}.scale" in scales
    assert f"{QAT_INPUT_FAKE_QUANT}.observer.min_val" in states[0]
    assert f"{QAT_INPUT_FAKE_QUANT}.observer.max_val" in states[0]
    # The second conv reads the first conv's output codes.
    assert "1.2.input_fake_quant.scale" not in scales
    _assert_ranks_equal(states)


@pytest.mark.parametrize("fake_quant", INPUT_FAKE_QUANTS)
@pytest.mark.parametrize("run", ["synced", "synced_without_buffer_broadcast", "fully_sharded"])
def test_sync_input_range_covers_every_rank(
    rank_results: dict[str, Any], run: str, fake_quant: str
) -> None:
    for state in _observers(rank_results, run):
        min_val = state[f"{fake_quant}.observer.min_val"].item()
        max_val = state[f"{fake_quant}.observer.max_val"].item()
        scale = state[f"{fake_quant}.scale"].item()
        zero_point = state[f"{fake_quant}.zero_point"].item()

        # Each batch of 768 uniform values in [0, 8] reaches to within about 0.01 of 8.
        assert 0 <= min_val < 0.01
        assert 7.9 < max_val <= 8
        assert scale == pytest.approx(8 / 255, rel=0.01)
        assert zero_point == 0


@pytest.mark.parametrize("fake_quant", INPUT_FAKE_QUANTS)
def test_unsynced_ranks_keep_own_input_range(rank_results: dict[str, Any], fake_quant: str) -> None:
    rank0, rank1 = _observers(rank_results, "unsynced")

    assert rank0[f"{fake_quant}.observer.max_val"].item() <= 1
    assert rank1[f"{fake_quant}.observer.max_val"].item() > 7.9
    assert rank0[f"{fake_quant}.scale"].item() == pytest.approx(1 / 255, rel=0.01)
    assert rank1[f"{fake_quant}.scale"].item() == pytest.approx(8 / 255, rel=0.01)
    output_scales = [key for key in rank0 if key.endswith("output_fake_quant.scale")]
    assert output_scales
    for key in output_scales:
        assert not torch.equal(rank0[key], rank1[key]), f"{key} is the same on both ranks"


@pytest.mark.parametrize("fake_quant", INPUT_FAKE_QUANTS)
def test_single_rank_group_keeps_own_range(rank_results: dict[str, Any], fake_quant: str) -> None:
    rank0, rank1 = _observers(rank_results, "single_rank_group")

    assert rank0[f"{fake_quant}.observer.max_val"].item() <= 1
    assert rank1[f"{fake_quant}.observer.max_val"].item() > 7.9
    for rank in rank_results["ranks"]:
        assert rank["single_rank_group"]["forward_collectives"] == []


@pytest.mark.parametrize("run", ["synced", "synced_without_buffer_broadcast"])
def test_sync_one_collective_per_observer_call(rank_results: dict[str, Any], run: str) -> None:
    for rank in rank_results["ranks"]:
        per_call = rank[run]["per_observer_call"]
        collectives = rank[run]["forward_collectives"]

        assert len(per_call) == FAKE_QUANTIZERS
        assert per_call == [1] * FAKE_QUANTIZERS
        assert len(collectives) == len(per_call), f"collectives in the forward: {collectives}"


def test_unsynced_forward_makes_no_collective(rank_results: dict[str, Any]) -> None:
    for rank in rank_results["ranks"]:
        assert rank["unsynced"]["per_observer_call"] == [0] * FAKE_QUANTIZERS
        assert rank["unsynced"]["forward_collectives"] == []


def test_per_channel_sync_skips_nan_rank(rank_results: dict[str, Any]) -> None:
    states = [rank["per_channel_with_nan"] for rank in rank_results["ranks"]]

    for rank, state in enumerate(states):
        assert state["first.observer.min_val"].tolist() == [-1, -2, -3]
        assert state["first.observer.max_val"].tolist() == [1, 2, 3]
        assert state["second.observer.min_val"].tolist() == [-2, -4, -6]
        assert state["second.observer.max_val"].tolist() == [2, 4, 6]
        # The count of non-finite batches stays each rank's own.
        assert state["first.observer.nonfinite_batches"].item() == (1 if rank == 0 else 0)
    shared = [
        {key: value for key, value in state.items() if "nonfinite_batches" not in key}
        for state in states
    ]
    _assert_ranks_equal(shared)


def test_two_rank_checkpoint_loads_in_one_process(
    ddp_ranks: Any, rank_results: dict[str, Any]
) -> None:
    assert not torch.distributed.is_initialized()
    state_dict = torch.load(
        rank_results["output_dir"] / ddp_ranks.STATE_DICT_FILE, weights_only=True
    )
    restored = ddp_ranks.build_model()

    restored.load_state_dict(state_dict, strict=True)
    restored.eval()
    with torch.no_grad():
        output = restored(ddp_ranks.eval_input())

    expected = rank_results["ranks"][0]["synced"]["eval_output"]
    assert torch.equal(output, expected)
    restored_state = ddp_ranks.observer_state(restored)
    saved_state = rank_results["ranks"][0]["synced"]["observers"]
    _assert_ranks_equal([restored_state, saved_state])
    for name, module in restored.named_modules():
        if isinstance(module, qatcore.FakeQuantize):
            assert module.scale.dtype == torch.float32, name
            assert module.zero_point.dtype == torch.int32, name


def test_observer_copies_keep_or_drop_the_group() -> None:
    pytest.importorskip("qatcore_observers")
    group = threading.Lock()  # stands for a ProcessGroup: neither can be pickled
    model = qatcore.swap_modules(nn.Sequential(nn.Conv2d(3, 4, 3)), qatcore.get_qconfig("x86"))
    qatcore.set_observer_sync(model, group=group)

    copied = copy.deepcopy(model)
    unpickled = pickle.loads(pickle.dumps(model))
    float_model = qatcore.to_float(model)

    assert copied[0].weight_fake_quant.observer.process_group is group
    assert unpickled[0].weight_fake_quant.observer.process_group is None
    assert unpickled[0].weight_fake_quant.observer.sync
    assert type(float_model[0]) is nn.Conv2d
