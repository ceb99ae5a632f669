"""DDP under torchrun on CPU: two processes train exactly as one with their global batch.

Each test launches ``python -m torch.distributed.run --standalone --nproc_per_node=2`` (gloo)
in its own session with a timeout, so a hung rank fails the test instead of the suite.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from memeff.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

REPO = Path(__file__).resolve().parents[1]
TINY = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=32, eval_iters=2,
            warmup_iters=5, max_iters=20, eval_interval=5)
PER_RANK_BATCH = 4
CASES = {"adamw": dict(optimizer="adamw"),
         # accumulation as well: gradients sync only in the last micro-step's backward
         "adamsn-accum2": dict(optimizer="adamsn", grad_accum_steps=2)}


def cli_args(fields: dict) -> list[str]:
    return [arg for name, value in fields.items()
            for arg in ("--" + name.replace("_", "-"), str(value))]


def torchrun(program: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    """``python *program`` in 2 processes; all of them are killed on timeout."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", *program]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and its workers: the session we made
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture(scope="module", params=list(CASES))
def two_process_run(request, tmp_path_factory):
    """(fields, out_dir, completed process) of a 2-process run with per-rank batch 4."""
    fields = dict(TINY, **CASES[request.param])
    out_dir = tmp_path_factory.mktemp(f"ddp-{request.param}")
    args = cli_args(dict(fields, batch_size=PER_RANK_BATCH, out_dir=out_dir))
    completed = torchrun(["-m", "memeff.train", *args], timeout=300)
    assert completed.returncode == 0, completed.stderr
    return fields, out_dir, completed


def test_two_processes_follow_one_process_with_the_global_batch(two_process_run):
    fields, out_dir, _ = two_process_run
    distributed = json.loads((out_dir / "result.json").read_text())
    single = train(TrainConfig(**fields, batch_size=2 * PER_RANK_BATCH))

    assert [e["iter"] for e in distributed["evals"]] == [0, 5, 10, 15, 20]
    for got, want in zip(distributed["evals"], single.evals, strict=True):
        assert got["iter"] == want["iter"]
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    assert distributed["evals"][-1]["train_loss"] < distributed["evals"][0]["train_loss"]
    assert distributed["world_size"] == 2 and single.world_size == 1
    # the state is replicated: each rank holds what one process holds
    assert distributed["optimizer_state_bytes_per_rank"] == [single.optimizer_state_bytes] * 2
    assert single.optimizer_state_bytes_per_rank == [single.optimizer_state_bytes]


def test_only_rank_0_logs_and_prints(two_process_run):
    _, out_dir, completed = two_process_run
    assert completed.stderr.count("eval 20/20") == 1, completed.stderr
    summary = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    assert len(summary) == 1 and json.loads(summary[0])["world_size"] == 2
    assert sorted(p.name for p in out_dir.iterdir()) == [".lock", "ckpt.pt", "result.json"]


def test_checkpoint_keeps_each_ranks_rng_and_refuses_another_world_size(two_process_run):
    fields, out_dir, _ = two_process_run
    checkpoint = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng_states"]) == 2
    with pytest.raises(ValueError, match="written by 2 process"):
        train(TrainConfig(**fields, batch_size=PER_RANK_BATCH, out_dir=str(out_dir), resume=True))


def test_failing_ranks_make_torchrun_exit_nonzero_with_the_error(tmp_path):
    empty = tmp_path / "no-data"
    empty.mkdir()
    # an override directory without the text: every rank fails without trying a download
    completed = torchrun(["-m", "memeff.train", *cli_args(dict(TINY, batch_size=PER_RANK_BATCH))],
                         timeout=120, MEMEFF_DATA_DIR=str(empty))
    assert completed.returncode != 0
    output = completed.stdout + completed.stderr
    assert f"MEMEFF_DATA_DIR={empty} but" in output, output


RANK_1_FAILS = """
import os, sys
import memeff.train
from memeff import cli

def load_dataset(name):
    if os.environ["RANK"] == "1":
        raise FileNotFoundError("rank 1 cannot read its data")
    return real_load_dataset(name)

real_load_dataset, memeff.train.load_dataset = memeff.train.load_dataset, load_dataset
sys.exit(cli.run(memeff.train.main))
"""


def test_one_failing_rank_ends_the_run_instead_of_hanging(tmp_path):
    script = tmp_path / "rank_1_fails.py"
    script.write_text(RANK_1_FAILS)
    # rank 0 goes on and waits for rank 1 in DDP's first collective until torchrun stops it
    completed = torchrun([str(script), *cli_args(dict(TINY, batch_size=PER_RANK_BATCH))],
                         timeout=120,
                         PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    assert completed.returncode != 0
    assert "error: rank 1 cannot read its data" in completed.stderr, completed.stderr
