"""Sampling from a checkpoint: a bad setting is one line and exit code 2 in the CLI."""

from dataclasses import asdict

import pytest
import torch

from memeff import checkpoint as checkpoints
from memeff import cli
from memeff.model import GPT, GPTConfig
from memeff.sample import main, sample_text


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, char_data):
    """An untrained one-layer char model, saved as memeff.train saves one."""
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16,
                       vocab_size=char_data.vocab_size)
    path = tmp_path_factory.mktemp("run") / checkpoints.CHECKPOINT_NAME
    checkpoints.save(path, dict(model=GPT(config).state_dict(), optimizer={}, iter=0,
                                train_config={}, model_config=asdict(config), dataset="char",
                                chars=char_data.chars, evals=[],
                                batch_generator=torch.Generator().get_state()))
    return path


@pytest.mark.parametrize("args, message", [
    pytest.param(["--temperature", "nan"], "temperature must be finite and > 0, got nan",
                 id="temperature-nan"),
    pytest.param(["--temperature", "inf"], "temperature must be finite and > 0, got inf",
                 id="temperature-inf"),
    pytest.param(["--temperature", "0"], "temperature must be finite and > 0, got 0.0",
                 id="temperature-0"),
    pytest.param(["--top-k", "0"], "top_k must be a positive integer", id="top-k-0"),
    pytest.param(["--max-new-tokens", "-1"], "max_new_tokens must be an integer >= 0",
                 id="max-new-tokens-negative"),
    pytest.param(["--num-samples", "0"], "num_samples must be a positive integer",
                 id="num-samples-0"),
    pytest.param(["--seed", "99999999999999999999999"],
                 "seed (--seed) must be an integer from -2**63 to 2**64 - 1", id="seed-too-large"),
    pytest.param(["--seed", str(-2**63 - 1)],
                 "seed (--seed) must be an integer from -2**63 to 2**64 - 1", id="seed-too-small"),
])
def test_bad_setting_is_one_line_and_exit_2(checkpoint, capsys, args, message):
    assert cli.run(main, [str(checkpoint), "--max-new-tokens", "3", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


@pytest.mark.parametrize("seed", [-2**63, 2**64 - 1], ids=["lowest", "highest"])
def test_seeds_at_the_ends_of_torchs_range_sample(checkpoint, seed):
    assert sample_text(checkpoint, "ROMEO:", max_new_tokens=5, seed=seed)[0].startswith("ROMEO:")


def test_vanishing_temperature_gives_the_likeliest_tokens_whatever_the_seed(checkpoint):
    texts = {sample_text(checkpoint, "ROMEO:", max_new_tokens=20, temperature=1e-45, top_k=None,
                         seed=seed)[0] for seed in (1, 2, 3)}
    assert len(texts) == 1
