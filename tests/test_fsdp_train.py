"""``memeff.train`` with ``parallel="fsdp"``: FSDP2 over 2 gloo processes trains as one
process with the global batch, and resumes from its sharded checkpoint exactly.

The processes are started with torch.multiprocessing and torchrun's environment
variables, so a test can end a run at an evaluation as a crash would.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from memeff import checkpoint as checkpoints
from memeff import train as train_module
from memeff.sample import load_checkpoint, sample_text
from memeff.data import load_dataset
from memeff.train import TrainConfig, split_loss, train

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

WORLD_SIZE = 2
# nanoGPT's baby config (4 layers, 4 heads, 128 wide, block 64, global batch 12), 20 iterations
BABY_20 = dict(max_iters=20, eval_interval=10, eval_iters=2, warmup_iters=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, fields: dict, result_file: str, interrupt_at_eval: int | None):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    if interrupt_at_eval is not None:  # every rank evaluates: all die at the same point
        evaluate, calls = train_module.estimate_loss, []

        def estimate_then_die(*args, **kwargs):
            calls.append(1)
            if len(calls) == interrupt_at_eval:
                os._exit(0)  # as a killed process: no cleanup, no result
            return evaluate(*args, **kwargs)

        train_module.estimate_loss = estimate_then_die
    result = train(TrainConfig(**fields))
    if rank == 0:
        Path(result_file).write_text(json.dumps(result.to_dict()))


def run_sharded(tmp_path: Path, fields: dict, interrupt_at_eval: int | None = None) -> dict | None:
    result_file = tmp_path / f"result-{len(list(tmp_path.iterdir()))}.json"
    mp.spawn(_rank, args=(_free_port(), fields, str(result_file), interrupt_at_eval),
             nprocs=WORLD_SIZE, join=True)
    return json.loads(result_file.read_text()) if result_file.exists() else None


# AdamSN+SM's collectives (gathered projector, summed projections) cover the training
# loop's; every optimizer's sharded step is checked in tests/test_sharded_optimizers.py
@pytest.mark.parametrize("optimizer", ["adamsnsm"])
def test_two_sharded_processes_follow_one_process_with_the_global_batch(tmp_path, optimizer):
    fields = dict(BABY_20, optimizer=optimizer, optimizer_hparams={"rank": 32, "gap": 8}
                  if optimizer == "adamsnsm" else {})
    sharded = run_sharded(tmp_path, dict(fields, parallel="fsdp", batch_size=6))
    single = train(TrainConfig(**fields, batch_size=12))
    assert [e["iter"] for e in sharded["evals"]] == [0, 10, 20]
    for got, want in zip(sharded["evals"], single.evals, strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    assert sharded["final_val_loss_whole_split"] == pytest.approx(
        single.final_val_loss_whole_split, rel=1e-5)
    # each rank holds its rows of the state and the replicated statistics whole
    per_rank = sharded["optimizer_state_bytes_per_rank"]
    assert len(per_rank) == 2 and max(per_rank) < single.optimizer_state_bytes <= sum(per_rank)


def test_a_sharded_run_resumes_from_its_checkpoint_on_the_same_trajectory(tmp_path):
    fields = dict(BABY_20, eval_interval=5, optimizer="adamsnsm", parallel="fsdp", batch_size=6,
                  optimizer_hparams={"rank": 32, "gap": 8}, dropout=0.1)
    uninterrupted = run_sharded(tmp_path, fields)
    run_dir = tmp_path / "run"
    # evaluations at 0, 5, 10 run and are checkpointed; the 4th is interrupted
    assert run_sharded(tmp_path, dict(fields, out_dir=str(run_dir)), interrupt_at_eval=4) is None
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", checkpoints.SHARDED_NAME]
    assert checkpoints.load_sharded_meta(run_dir)["iter"] == 10
    resumed = run_sharded(tmp_path, dict(fields, out_dir=str(run_dir), resume=True))
    assert resumed["iters_run"] == 10
    assert resumed["evals"] == uninterrupted["evals"]  # bit-identical, 0 through 20
    assert resumed["final_val_loss_whole_split"] == uninterrupted["final_val_loss_whole_split"]
    # one process reads the whole final weights from the shards (the checkpoint at 20)
    model, _, _ = load_checkpoint(run_dir)
    whole_split = split_loss(model, load_dataset("char").val, model.config.block_size, "cpu")
    assert whole_split == pytest.approx(resumed["final_val_loss_whole_split"], rel=1e-6)
    assert len(sample_text(run_dir, prompt="ROMEO:", max_new_tokens=5)[0]) == len("ROMEO:") + 5


def test_fsdp_in_one_process_is_a_clear_error():
    with pytest.raises(ValueError, match="--parallel fsdp shards the model over torchrun"):
        train(TrainConfig(**BABY_20, parallel="fsdp"))
