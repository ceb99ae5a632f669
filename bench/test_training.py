"""Final loss on Tiny Shakespeare: nanoGPT's baby config trained with each optimizer.

Every run is ``memeff.train.train`` with the baby config and one row of
:data:`HPARAMS`; runs differ only in optimizer, its learning rate and weight decay, and
(for the GQA and MQA rows) ``n_kv_head``. Each seed is one row; the summary gives the mean
and spread (max - min) over seeds.
"""

from __future__ import annotations

import statistics

import pytest

from memeff.sample import sample_text
from memeff.train import TrainConfig, train

# Peak lr and weight decay per optimizer; the schedule (100 warmup iterations, cosine to
# lr/10) and everything else is nanoGPT's baby config.
# Where each value comes from: a one-seed trial with nanoGPT's own train.py on this
# project's CPU, 2000 iterations (issue "Reproduce and beat the published loss table"):
# AdamW was best at 3e-3 (val 1.761; 1.886 at nanoGPT's default 1e-3); AdamSN at 3e-2
# with weight decay 0.01 (1.772); torch's Adafactor at 3e-2 to 1e-1 without weight
# decay (1.772 / 1.767). Our Adafactor follows torch's update, so it starts from torch's
# value; subspace momentum starts from AdamSN's. A sweep on this suite's own runs will
# replace these values.
HPARAMS = {
    "adamw": dict(learning_rate=3e-3, weight_decay=0.1),
    "adamsn": dict(learning_rate=3e-2, weight_decay=0.01),
    # rank 32: the default 128 is full rank for this 128-wide model (subspace momentum
    # would then be plain AdamSN); 32 keeps a quarter of each weight's momentum
    "adamsnsm": dict(learning_rate=3e-2, weight_decay=0.01, optimizer_hparams={"rank": 32}),
    "adafactor": dict(learning_rate=3e-2, weight_decay=0.0),
    "torch_adafactor": dict(learning_rate=3e-2, weight_decay=0.0),
}
# nanoGPT's own settings for the baby config, kept as rows so the earlier fork's table
# (which used them) compares like for like
NANOGPT_LR = dict(learning_rate=1e-3, weight_decay=0.1)
# label: (optimizer, n_kv_head, dataset, profiles that run it, lr and weight decay if not
# HPARAMS'). quick runs every char row for 200 iterations; default, which must stay under
# 15 minutes on a 2-core CPU (about 2.5 minutes per 2000-iteration run), trains only the
# three headline optimizers.
EVERY, HEADLINE, FULL = ("quick", "default", "full"), ("quick", "full"), ("full",)
RUNS = {
    "adamw": ("adamw", None, "char", EVERY, None),
    "adamsn": ("adamsn", None, "char", EVERY, None),
    "adafactor": ("adafactor", None, "char", EVERY, None),
    "adamsnsm": ("adamsnsm", None, "char", HEADLINE, None),
    "torch_adafactor": ("torch_adafactor", None, "char", HEADLINE, None),
    "adamw-gqa2": ("adamw", 2, "char", HEADLINE, None),
    "adamw-mqa1": ("adamw", 1, "char", HEADLINE, None),
    "adamw-lr1e-3": ("adamw", None, "char", FULL, NANOGPT_LR),
    "adamsn-lr1e-3": ("adamsn", None, "char", FULL, NANOGPT_LR),
    "adafactor-lr1e-3": ("adafactor", None, "char", FULL, NANOGPT_LR),
    "adamw-bpe": ("adamw", None, "bpe", FULL, None),
    "adamsn-bpe": ("adamsn", None, "bpe", FULL, None),
    "adafactor-bpe": ("adafactor", None, "bpe", FULL, None),
}
# the text sample each run's first seed writes, from its final checkpoint (KV-cache generation)
SAMPLE = dict(prompt="ROMEO:", max_new_tokens=200, temperature=0.8, top_k=200, seed=1337)
ITERATIONS = {"quick": (200, 100), "default": (2000, 250), "full": (2000, 250)}  # iters, eval every


def suite_config(profile: str) -> dict:
    max_iters, eval_interval = ITERATIONS[profile]
    return {"base": {k: v for k, v in vars(TrainConfig()).items()
                     if k not in ("out_dir", "resume", "seed", "optimizer_hparams")},
            "max_iters": max_iters, "eval_interval": eval_interval,
            "hparams": HPARAMS, "sample": SAMPLE,
            "runs": {k: [*v[:3], v[4] or HPARAMS[v[0]]] for k, v in RUNS.items() if profile in v[3]}}


@pytest.mark.benchmark(group="training")
@pytest.mark.parametrize("label", list(RUNS))
def test_training(benchmark, record, device, profile, seeds, label, tmp_path):
    name, n_kv_head, dataset, profiles, lr_override = RUNS[label]
    if profile not in profiles:
        pytest.skip(f"runs in the {' and '.join(profiles)} profiles: use --profile full")
    max_iters, eval_interval = ITERATIONS[profile]
    hparams = {**HPARAMS[name], **(lr_override or {})}
    results = []

    def run_all_seeds():
        for seed in seeds:
            out_dir = str(tmp_path / f"seed{seed}") if seed == seeds[0] else None  # for the sample
            cfg = TrainConfig(optimizer=name, n_kv_head=n_kv_head, dataset=dataset, seed=seed,
                              max_iters=max_iters, eval_interval=eval_interval,
                              log_interval=max_iters, device=device.type, out_dir=out_dir,
                              **hparams)
            results.append(train(cfg))

    benchmark.pedantic(run_all_seeds, rounds=1, iterations=1)
    sample = sample_text(tmp_path / f"seed{seeds[0]}", device=device.type, **SAMPLE)[0]
    for seed, result in zip(seeds, results):
        assert result.final_val_loss < result.evals[0]["val_loss"], "training did not learn"
        record(label=label, optimizer=name, n_head=result.config["n_head"],
               n_kv_head=n_kv_head or result.config["n_head"], dataset=dataset, seed=seed,
               max_iters=max_iters, learning_rate=hparams["learning_rate"],
               weight_decay=hparams["weight_decay"],
               optimizer_hparams=hparams.get("optimizer_hparams", {}), evals=result.evals,
               final_train_loss=result.final_train_loss, final_val_loss=result.final_val_loss,
               median_ms_per_iter=result.median_ms_per_iter, tokens_per_s=result.tokens_per_s,
               optimizer_state_bytes=result.optimizer_state_bytes, n_params=result.n_params,
               sample=sample if seed == seeds[0] else None, median_s=None, rounds=None)


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "spread": max(values) - min(values), "n": len(values)}


def summarize(rows: list[dict]) -> dict:
    """Mean and spread over seeds per run."""
    summary = {}
    for label in dict.fromkeys(r["label"] for r in rows):
        runs = [r for r in rows if r["label"] == label]
        summary[label] = {
            key: spread([r[key] for r in runs])
            for key in ("final_train_loss", "final_val_loss", "median_ms_per_iter", "tokens_per_s")
        }
        summary[label]["optimizer_state_bytes"] = runs[0]["optimizer_state_bytes"]
    return summary
