"""The checkpoint format: what train writes, sample and resume read, and clear errors on
files that are not whole memeff checkpoints."""

import os

import pytest
import torch

from memeff import checkpoint
from memeff.sample import sample_text
from memeff.train import TrainConfig, train

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=2, max_iters=2,
            eval_iters=1, eval_interval=1, warmup_iters=0, log_interval=1000)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(**TINY, out_dir=str(out)))
    return out


def test_a_trained_run_holds_every_required_key(run_dir):
    saved = checkpoint.load(run_dir)
    assert all(key in saved for key in checkpoint.REQUIRED_KEYS)
    assert saved["iter"] == TINY["max_iters"]


@pytest.mark.parametrize("corrupt, message", [
    (lambda good: good[: len(good) // 2], "not a readable checkpoint"),
    (lambda good: b"", "not a readable checkpoint"),
    (lambda good: os.urandom(4096), "not a readable checkpoint"),
])
def test_a_corrupt_file_is_a_clear_error(run_dir, tmp_path, corrupt, message):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(corrupt((run_dir / "ckpt.pt").read_bytes()))
    with pytest.raises(ValueError, match=message):
        checkpoint.load(path)
    with pytest.raises(ValueError, match=message):
        sample_text(path, max_new_tokens=2)


def test_a_bare_state_dict_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a memeff training checkpoint .*lacks model"):
        checkpoint.load(path)


def test_a_pickled_object_is_refused_without_advising_to_unpickle_it(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": object()}, path)
    with pytest.raises(ValueError, match="objects other than tensors") as info:
        checkpoint.load(path)
    assert "weights_only=False" not in str(info.value)


def test_resume_removes_temporaries_a_killed_save_left(run_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes((run_dir / "ckpt.pt").read_bytes())
    leftover = out / ".ckpt.pt.abc123.tmp"
    leftover.write_bytes(b"partial")
    train(TrainConfig(**TINY, out_dir=str(out), resume=True))
    assert not leftover.exists()


def test_resuming_a_finished_run_trains_nothing_and_keeps_its_result(run_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("ckpt.pt", "result.json"):
        (out / name).write_bytes((run_dir / name).read_bytes())
    result = train(TrainConfig(**TINY, out_dir=str(out), resume=True))
    assert (out / "result.json").read_bytes() == (run_dir / "result.json").read_bytes()
    assert result.iters_run == TINY["max_iters"] and result.median_ms_per_iter is not None


def test_zero_iterations_give_null_timings_not_nan(tmp_path):
    result = train(TrainConfig(**dict(TINY, max_iters=0), out_dir=str(tmp_path)))
    assert result.median_ms_per_iter is None and result.tokens_per_s is None
    assert '"median_ms_per_iter": null' in (tmp_path / "result.json").read_text()
