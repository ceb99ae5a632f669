"""The command-line tools: a short training run, sampling, and one-line errors on bad input."""

import os
import subprocess
import sys

import pytest
import torch.distributed as dist

TINY_ARGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
             "--batch-size", "4", "--eval-iters", "1", "--eval-interval", "5", "--max-iters", "5"]


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_train_then_sample(tmp_path):
    out_dir = tmp_path / "run"
    trained = run("memeff.train", *TINY_ARGS, "--out-dir", str(out_dir))
    assert trained.returncode == 0, trained.stderr
    assert "eval 5/5" in trained.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == [".lock", "ckpt.pt", "result.json"]

    sampled = run("memeff.sample", str(out_dir), "--prompt", "ROMEO:", "--max-new-tokens", "30")
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("ROMEO:")
    assert len(sampled.stdout.rstrip("\n")) >= len("ROMEO:") + 20  # newlines may be sampled


@pytest.mark.parametrize("args, message", [
    (["--n-kv-head", "3"], "n_kv_head"),
    (["--optimizer", "sgd"], "optimizer"),
    (["--max-iters", "many"], "--max-iters"),
    (["--bogus"], "--bogus"),
    (["--optimizer-hparams", "[1]"], "JSON object"),
    (["--resume"], "no checkpoint"),
    (["--seed", "99999999999999999999999"], "seed (--seed) must be an integer from -2**63 to 2**64"),
])
def test_train_bad_arguments_exit_2_with_one_line_and_write_nothing(tmp_path, args, message):
    out_dir = tmp_path / "run"
    result = run("memeff.train", *TINY_ARGS, "--out-dir", str(out_dir), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out_dir.exists()


def test_train_with_a_block_size_longer_than_the_val_split_fails_at_once(tmp_path):
    out_dir = tmp_path / "run"
    result = run("memeff.train", *TINY_ARGS, "--block-size", "111540", "--out-dir", str(out_dir))
    assert result.returncode == 2
    assert result.stderr == ("error: --block-size 111540 is too long for the val split, which "
                             "holds 111540 tokens (--dataset char); a window takes block_size + 1 "
                             "of them: use --block-size 111539 or less\n")
    assert sorted(p.name for p in out_dir.iterdir()) == [".lock"]  # the run held it, and no more


def test_train_that_diverges_exits_3_with_one_error_line_keeping_the_last_checkpoint(tmp_path):
    out_dir = tmp_path / "run"
    result = run("memeff.train", *TINY_ARGS, "--lr", "1e6", "--warmup-iters", "0",
                 "--out-dir", str(out_dir))
    assert result.returncode == 3, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: training diverged at iteration 1: the loss is nan; try a lower "
                      "--learning-rate"], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert sorted(p.name for p in out_dir.iterdir()) == [".lock", "ckpt.pt"]


RANK_1_LOSS_IS_INFINITE = """
import os, sys
import memeff.train
from memeff import cli
from memeff.model import GPT

class InfiniteLossOnRank1(GPT):
    forward_passes = 0

    def forward(self, idx, targets=None):
        logits, loss = super().forward(idx, targets)
        if self.training and os.environ["RANK"] == "1":
            InfiniteLossOnRank1.forward_passes += 1
            if InfiniteLossOnRank1.forward_passes == 4:  # iteration 3
                loss = loss + float("inf")  # a constant: the gradients stay finite
        return logits, loss

memeff.train.GPT = InfiniteLossOnRank1
sys.exit(cli.run(memeff.train.main))
"""


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="needs torch.distributed with gloo")
def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_exit_3(tmp_path):
    from test_distributed import REPO, torchrun

    script = tmp_path / "rank_1_loss_is_infinite.py"
    script.write_text(RANK_1_LOSS_IS_INFINITE)
    out_dir = tmp_path / "run"
    # the largest seed: rank 1 seeds its dropout with it + 1, which wraps around to 0
    completed = torchrun([str(script), *TINY_ARGS, "--seed", str(2**64 - 1),
                          "--out-dir", str(out_dir)], timeout=120,
                         PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    assert completed.returncode != 0
    # rank 0, whose own loss was finite, stopped too, and says why
    assert ("error: training diverged at iteration 3: the loss is inf"
            in completed.stderr), completed.stderr
    assert "exitcode  : 3" in completed.stderr, completed.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == [".lock", "ckpt.pt"]


@pytest.mark.parametrize("args, message", [
    (["missing-dir"], "no checkpoint"),
    (["missing-dir", "--max-new-tokens", "x"], "--max-new-tokens"),
])
def test_sample_bad_arguments_exit_2_with_one_line(tmp_path, args, message):
    result = run("memeff.sample", *args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_train_help_describes_every_flag_and_lists_the_choices():
    from memeff.optim import REGISTRY
    from memeff.train import _parser

    parser = _parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no description"
    text = parser.format_help()
    assert all(name in text for name in REGISTRY) and "{char,bpe}" in text


@pytest.mark.parametrize("device, message", [("foo", "not a device"), ("meta", "use cpu, cuda")])
def test_sample_on_a_device_that_does_not_exist_is_one_line(tmp_path, device, message):
    sampled = run("memeff.sample", str(tmp_path), "--device", device)
    assert sampled.returncode == 2
    assert message in sampled.stderr and "Traceback" not in sampled.stderr
