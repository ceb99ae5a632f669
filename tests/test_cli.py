"""The command-line tools: a short training run, sampling, and one-line errors on bad input."""

import subprocess
import sys

import pytest

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
])
def test_train_bad_arguments_exit_2_with_one_line_and_write_nothing(tmp_path, args, message):
    out_dir = tmp_path / "run"
    result = run("memeff.train", *TINY_ARGS, "--out-dir", str(out_dir), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out_dir.exists()


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
