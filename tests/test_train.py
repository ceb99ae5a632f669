"""Training: the loss falls, runs are deterministic, and resuming continues the same trajectory."""

import math

import pytest
import torch

from memeff import checkpoint
from memeff import train as train_module
from memeff.model import GPT, GPTConfig
from memeff.train import TrainConfig, TrainingDiverged, lr_at, split_loss, train

TINY = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=32, batch_size=8,
            eval_iters=2, warmup_iters=5, log_interval=1000)


def test_lr_schedule_is_nanogpts():
    cfg = TrainConfig()
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 101)
    assert lr_at(99, cfg) == pytest.approx(1e-3 * 100 / 101)
    assert lr_at(100, cfg) == pytest.approx(1e-3)
    assert lr_at(1050, cfg) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))
    assert lr_at(2000, cfg) == pytest.approx(1e-4)
    assert lr_at(2500, cfg) == 1e-4


def test_schedule_decays_to_a_tenth_of_the_peak_unless_min_lr_is_given():
    assert lr_at(2000, TrainConfig(learning_rate=3e-2)) == pytest.approx(3e-3)
    assert lr_at(2000, TrainConfig(learning_rate=3e-2, min_lr=1e-4)) == 1e-4
    assert lr_at(2000, TrainConfig(learning_rate=3e-2, min_lr=0.0)) == 0.0


def test_defaults_are_the_baby_gpt_config():
    cfg = TrainConfig()
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.batch_size) == (4, 4, 128, 64, 12)
    assert (cfg.max_iters, cfg.learning_rate, cfg.final_lr, cfg.warmup_iters) == (2000, 1e-3, 1e-4, 100)
    assert (cfg.weight_decay, cfg.grad_clip, cfg.dropout) == (0.1, 1.0, 0.0)
    assert cfg.optimizer_settings()["betas"] == (0.9, 0.99)
    assert (cfg.eval_interval, cfg.eval_iters) == (250, 20)


def test_hundred_iterations_lower_the_loss():
    result = train(TrainConfig(**TINY, max_iters=100, eval_interval=100, learning_rate=3e-3))
    first, last = result.evals[0], result.evals[-1]
    assert [e["iter"] for e in result.evals] == [0, 100]
    assert last["train_loss"] < first["train_loss"] - 0.5
    assert last["val_loss"] < first["val_loss"] - 0.5
    assert result.iters_run == 100
    assert result.optimizer_state_bytes > 0 and result.tokens_per_s > 0
    # the whole split and nanoGPT's 2 random batches measure the same loss
    assert result.final_val_loss_whole_split == pytest.approx(result.final_val_loss, abs=0.2)


class _RecordingModel(torch.nn.Module):
    """Returns a known loss per batch and keeps the windows it was given."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x, y):
        self.batches.append((x, y))
        return None, y.double().mean()


def test_split_loss_predicts_every_token_once_in_consecutive_windows():
    ids = torch.arange(1000)
    model = _RecordingModel()
    loss = split_loss(model, ids, block_size=64, device="cpu", batch_size=5)
    inputs = torch.cat([x for x, _ in model.batches])
    targets = torch.cat([y for _, y in model.batches])
    windows = 999 // 64  # 15 full windows; the last 39 tokens are too few for one
    assert inputs.shape == targets.shape == (windows, 64)
    assert torch.equal(inputs.flatten(), ids[:windows * 64])
    assert torch.equal(targets.flatten(), ids[1:windows * 64 + 1])
    assert [len(x) for x, _ in model.batches] == [5, 5, 5]
    assert loss == pytest.approx(ids[1:windows * 64 + 1].double().mean().item(), rel=1e-12)
    assert model.training  # put back as it was


def test_split_loss_is_the_mean_cross_entropy_of_every_target(char_data):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16,
                          vocab_size=char_data.vocab_size)).double()
    ids = char_data.val[:500]
    windows = 499 // 16
    x = ids[:windows * 16].view(windows, 16)
    y = ids[1:windows * 16 + 1].view(windows, 16)
    logits, _ = model(x)
    log_probs = logits - logits.exp().sum(-1, keepdim=True).log()  # log-softmax from its formula
    reference = -log_probs.gather(-1, y[..., None]).mean().item()
    for batch_size in (1, 7, 64):  # batching does not change the mean
        assert split_loss(model, ids, 16, "cpu", batch_size) == pytest.approx(reference, rel=1e-12)


def test_split_loss_of_a_too_short_split_is_a_clear_error():
    with pytest.raises(ValueError, match="too short for block_size 64"):
        split_loss(_RecordingModel(), torch.arange(64), block_size=64, device="cpu")


def test_a_group_with_its_own_peak_lr_keeps_its_ratio_through_the_schedule(tmp_path):
    cfg = TrainConfig(**TINY, max_iters=12, eval_interval=6, optimizer="adamsn", learning_rate=4e-2,
                      out_dir=str(tmp_path),
                      optimizer_hparams={"group_hparams": {"no_decay": {"lr": 3e-3}}})
    train(cfg)
    groups = torch.load(tmp_path / "ckpt.pt", weights_only=False)["optimizer"]["param_groups"]
    by_decay = {g["weight_decay"] == 0: g["lr"] for g in groups}  # no_decay is the only undecayed
    assert by_decay[False] == lr_at(12, cfg)
    assert by_decay[True] == pytest.approx(lr_at(12, cfg) * 3e-3 / 4e-2, rel=1e-12)


def test_same_seed_gives_identical_losses_and_leaves_global_rng_alone():
    cfg = TrainConfig(**TINY, max_iters=20, eval_interval=10)
    torch.manual_seed(99)
    before = torch.get_rng_state()
    first = train(cfg)
    assert torch.equal(torch.get_rng_state(), before)
    second = train(cfg)
    assert first.evals == second.evals
    other = train(TrainConfig(**TINY, max_iters=20, eval_interval=10, seed=1))
    assert other.evals != first.evals


def test_interrupted_run_resumes_on_the_same_trajectory(tmp_path, interrupt_at_eval):
    cfg = dict(TINY, max_iters=40, eval_interval=10, dropout=0.1)
    uninterrupted = train(TrainConfig(**cfg))

    disarm = interrupt_at_eval(4)  # evaluations at 0, 10, 20 have run and been checkpointed
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**cfg, out_dir=str(tmp_path)))
    disarm()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "ckpt.pt"]  # no temporaries

    resumed = train(TrainConfig(**cfg, out_dir=str(tmp_path), resume=True))
    assert resumed.iters_run == 20
    assert resumed.evals == uninterrupted.evals  # bit-identical floats, 0 through 40
    assert (tmp_path / "result.json").is_file()


def test_resume_with_another_configuration_is_refused(tmp_path):
    train(TrainConfig(**TINY, max_iters=2, eval_interval=1, out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="learning_rate"):
        train(TrainConfig(**TINY, max_iters=2, eval_interval=1, out_dir=str(tmp_path),
                          resume=True, learning_rate=5e-3))


def test_fresh_run_never_overwrites_a_checkpoint(tmp_path):
    cfg = dict(TINY, max_iters=2, eval_interval=1, out_dir=str(tmp_path))
    train(TrainConfig(**cfg))
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(ValueError, match="--resume"):
        train(TrainConfig(**cfg, seed=5))
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(TrainConfig(**TINY, out_dir=str(tmp_path), resume=True))


@pytest.mark.parametrize("fields, message", [
    (dict(batch_size=0), "batch_size"),
    (dict(max_iters=-1), "max_iters"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(beta2=1.0), "beta2"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(dataset="words"), "dataset"),
    (dict(optimizer="sgd"), "optimizer"),
    (dict(n_kv_head=3), "n_kv_head"),
    (dict(resume=True), "out_dir"),
    (dict(warmup_iters=100, lr_decay_iters=50), "lr_decay_iters"),
    (dict(device="foo"), "device must be 'cpu', 'cuda' or 'cuda:N', got 'foo'"),
    (dict(device="cuda:x"), "device"),
    (dict(device="meta"), "device"),
    (dict(learning_rate=math.inf), "learning_rate must be a finite number"),
    (dict(min_lr=math.nan), "min_lr must be a finite number"),
    (dict(weight_decay=math.nan), "weight_decay must be a finite number"),
    (dict(grad_clip=math.nan), "grad_clip must be a finite number"),
    (dict(seed=99999999999999999999999), r"seed \(--seed\) must be an integer from -2\*\*63 to"),
    (dict(seed=-2**63 - 1), r"seed \(--seed\) must be an integer from -2\*\*63 to 2\*\*64 - 1"),
    (dict(optimizer="adafactor", beta2=0.9), "adafactor takes no beta2"),
    (dict(optimizer="torch_adafactor", beta1=0.9), "torch_adafactor takes no beta1"),
    (dict(optimizer_hparams={"lr": 1e-3}), "optimizer_hparams sets lr; use --learning-rate"),
    (dict(optimizer_hparams={"betas": [0.9, 0.9]}), "use --beta1/--beta2"),
    (dict(optimizer_hparams={"foo": 1}), "adamw does not take foo"),
    (dict(optimizer="adamw", optimizer_hparams={"rank": 4}), "adamw does not take rank"),
])
def test_bad_train_config_names_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields)


def test_every_seed_torch_takes_is_a_seed():
    for seed in (-2**63, -1, 0, 2**64 - 1):  # torch takes a negative seed modulo 2**64
        assert TrainConfig(seed=seed).seed == seed


def test_beta1_is_our_adafactors_first_moment():
    assert TrainConfig(optimizer="adafactor", beta1=0.9).optimizer_settings()["beta1"] == 0.9
    assert "beta1" not in TrainConfig(optimizer="adafactor").optimizer_settings()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_device_without_a_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="torch sees no GPU"):
        train(TrainConfig(**TINY, device="cuda", out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="torch sees no GPU"):
        train(TrainConfig(**TINY, device="cuda:1", out_dir=str(tmp_path)))
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_second_run_into_a_held_out_dir_stops_before_training(tmp_path):
    from memeff.io import directory_lock

    with directory_lock(tmp_path):
        with pytest.raises(ValueError, match="in use by another run"):
            train(TrainConfig(**TINY, max_iters=1, out_dir=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_an_out_dir_under_a_file_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cannot write into"):
        train(TrainConfig(**TINY, max_iters=1, out_dir=str(tmp_path / "file" / "run")))


def test_a_block_size_longer_than_a_split_fails_before_the_model_is_built(char_data, monkeypatch):
    monkeypatch.setattr(train_module, "GPT",
                        lambda *args: pytest.fail("built the model before checking the splits"))
    too_long = len(char_data.val)  # a window takes block_size + 1 tokens
    with pytest.raises(ValueError, match=rf"--block-size {too_long} .* the val split, "
                                         rf"which holds {too_long} tokens"):
        train(TrainConfig(**dict(TINY, block_size=too_long), max_iters=1))


def _finite(state) -> bool:
    """Whether every tensor in a (nested) state dict is finite."""
    if isinstance(state, torch.Tensor):
        return bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(map(_finite, state.values()))
    return all(map(_finite, state)) if isinstance(state, (list, tuple)) else True


# lr 1e6: AdamW's first step leaves finite weights whose next forward overflows to nan
DIVERGES = dict(TINY, warmup_iters=0, learning_rate=1e6, max_iters=6)


@pytest.mark.parametrize("eval_interval, what", [(3, "loss"), (1, "evaluation's train loss")])
def test_a_run_stops_at_its_first_non_finite_loss_keeping_its_last_good_checkpoint(
        tmp_path, eval_interval, what):
    with pytest.raises(TrainingDiverged, match=f"at iteration 1: the {what} is nan") as info:
        train(TrainConfig(**DIVERGES, eval_interval=eval_interval, out_dir=str(tmp_path)))
    assert (info.value.iteration, info.value.what) == (1, what)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "ckpt.pt"]  # no result.json
    saved = checkpoint.load(tmp_path)
    assert saved["iter"] == 0 and _finite(saved["model"])


@pytest.fixture
def nan_gradient_at(monkeypatch):
    """``arm(k)``: train()'s model then gets a NaN in one element of one weight's gradient at
    iteration k (and only there); the loss stays finite."""

    def arm(iteration: int):
        class NaNGradient(GPT):
            def __init__(self, config):
                super().__init__(config)
                backward_passes = []

                def poison(grad):
                    backward_passes.append(1)
                    if len(backward_passes) == iteration + 1:
                        grad = grad.clone()
                        grad[0, 0] = math.nan
                    return grad

                self.transformer.h[0].mlp.c_fc.weight.register_hook(poison)

        monkeypatch.setattr(train_module, "GPT", NaNGradient)

    return arm


@pytest.mark.parametrize("grad_clip", [1.0, 0.0], ids=["clipped", "unclipped"])
@pytest.mark.parametrize("optimizer", ["adamw", "adamsn", "adafactor"])
def test_a_nan_gradient_stops_the_run_before_the_optimizer_applies_it(
        tmp_path, nan_gradient_at, optimizer, grad_clip):
    nan_gradient_at(2)
    cfg = TrainConfig(**dict(TINY, max_iters=4, eval_interval=1), optimizer=optimizer,
                      weight_decay=0.0, grad_clip=grad_clip, out_dir=str(tmp_path))
    with pytest.raises(TrainingDiverged, match="diverged at iteration 2: the gradient norm is nan"):
        train(cfg)
    saved = checkpoint.load(tmp_path)  # evaluated and written at iteration 2, before the step
    assert saved["iter"] == 2 and [e["iter"] for e in saved["evals"]] == [0, 1, 2]
    assert _finite(saved["model"]) and _finite(saved["optimizer"])
