"""The README's results section and figures are exactly what results/ generates."""

import json
import shutil
from pathlib import Path

import pytest

from bench import report

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "cpu"


def test_readme_tables_match_committed_results():
    results = report.load_results(RESULTS)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert report.render_readme(readme, report.tables(results)) == readme, (
        "README.md is out of date with results/: run python -m bench.report")


def test_every_published_figure_is_committed_and_shown():
    results = report.load_results(RESULTS)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name, (suite, _) in report.FIGURES.items():
        if suite in results:
            assert (REPO / "plots" / name).is_file(), f"plots/{name} missing"
            assert f"(plots/{name})" in readme, f"README does not show plots/{name}"


def test_figures_are_byte_identical_from_the_same_results():
    results = report.load_results(RESULTS)
    if not results:
        pytest.skip("no results committed")
    first, second = report.figures(results), report.figures(results)
    assert first == second
    for png in first.values():
        assert b"Software" not in png and b"Creation" not in png


def test_bad_results_file_stops_before_writing(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "kv_cache.json").write_text(json.dumps({"schema_version": 1, "suite": "kv_cache"}))
    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    before = readme.read_bytes()
    code = report.cli.run(report.main, ["--results-dir", str(results), "--plots-dir",
                                        str(tmp_path / "plots"), "--readme", str(readme)])
    assert code == 2
    assert "kv_cache.json" in capsys.readouterr().err
    assert readme.read_bytes() == before
    assert not (tmp_path / "plots").exists()


def test_missing_suite_leaves_a_pending_note():
    text = "<!-- results:kv-table -->\nold\n<!-- /results:kv-table -->"
    assert "No results published" in report.render_readme(text, {})


def training_document(tmp_path):
    """A small training results file in the suite's own format, run through its summary."""
    from bench.test_training import summarize
    from bench.results import environment, results_document

    def row(label, optimizer, n_kv_head, seed, val, state, whole_split=True):
        evals = [{"iter": 0, "train_loss": 4.2, "val_loss": 4.2},
                 {"iter": 10, "train_loss": val - 0.1, "val_loss": val}]
        return dict(test=f"test_training[{label}]", label=label, optimizer=optimizer, n_head=4,
                    n_kv_head=n_kv_head, dataset="char", seed=seed, max_iters=10,
                    learning_rate=3e-3, weight_decay=0.1, optimizer_hparams={}, evals=evals,
                    final_train_loss=val - 0.1, final_val_loss=val, median_ms_per_iter=1.0,
                    tokens_per_s=1.0, optimizer_state_bytes=state, n_params=10,
                    sample="ROMEO:\nHe said `hi`" if seed == 1 else None,
                    **({"final_val_loss_whole_split": val + 0.01 * seed} if whole_split else {}))

    rows = [row("adamw", "adamw", 4, 1, 2.0, 800), row("adamw", "adamw", 4, 2, 2.2, 800),
            row("adamsn", "adamsn", 4, 1, 2.1, 400), row("adamsn", "adamsn", 4, 2, 2.1, 400),
            # as in results written before the whole-split loss existed
            row("adamw-mqa1", "adamw", 1, 1, 2.3, 700, whole_split=False),
            row("adamw-mqa1", "adamw", 1, 2, 2.3, 700, whole_split=False)]
    tuned = dict(learning_rate=3e-3, weight_decay=0.1)
    config = {"base": {"n_head": 4}, "max_iters": 10,
              "sample": dict(prompt="ROMEO:", max_new_tokens=5, temperature=0.8, top_k=200, seed=1),
              "hparams": {"adamw": tuned, "adamsn": tuned},
              "runs": {label: {"hparams": dict(tuned)} for label in ("adamw", "adamsn", "adamw-mqa1")}}
    document = results_document("training", "full", environment(), [1, 2], config, rows)
    document["summary"] = summarize(rows)
    return document


def test_training_table_gives_mean_half_spread_and_share_of_adamw(tmp_path):
    table = report.training_table(training_document(tmp_path), None).splitlines()
    assert table[2].startswith("| AdamW | 0.003 / 0.1 | 2 | 2.0000 ± 0.1000 | 2.1000 ± 0.1000 "
                               "| 2.1150 ± 0.1050 | 800 B | 100.0% | n/a | 100% |")
    assert table[3].startswith("| AdamSN | 0.003 / 0.1 | 2 | 2.0000 ± 0.0000 | 2.1000 ± 0.0000 "
                               "| 2.1150 ± 0.0050 | 400 B | 50.0% |")
    assert table[4].startswith("| AdamW (MQA, 1 K/V head) | 0.003 / 0.1 | 2 | 2.2000 ± 0.0000 "
                               "| 2.3000 ± 0.0000 | n/a | 700 B |")
    assert table[4].endswith("| 25% |")
    assert sum("*not ours:*" in line for line in table) == len(report.REFERENCE_ROWS)


def test_a_run_with_another_warmup_is_named_and_kept_out_of_the_figures(tmp_path):
    from memeff.train import TrainConfig

    assert report.NANOGPT_WARMUP_ITERS == TrainConfig().warmup_iters
    document = training_document(tmp_path)
    for r in document["rows"]:
        if r["label"] == "adamsn":
            r["label"], r["warmup_iters"] = "adamsn-warmup200", 200
    document["summary"] = {("adamsn-warmup200" if k == "adamsn" else k): v
                           for k, v in document["summary"].items()}
    runs = document["config"]["runs"]
    runs["adamsn-warmup200"] = {"hparams": {**runs.pop("adamsn")["hparams"], "warmup_iters": 200}}
    table = report.training_table(document, None).splitlines()
    assert table[3].startswith("| AdamSN (200 warmup iterations) | 0.003 / 0.1 | 2 |")
    assert report.headline_labels(document) == ["adamw", "adamw-mqa1"]


def test_a_run_at_another_lr_is_kept_out_of_the_figures(tmp_path):
    document = training_document(tmp_path)
    document["config"]["runs"]["adamsn"]["hparams"]["learning_rate"] = 6e-3
    assert report.headline_labels(document) == ["adamw", "adamw-mqa1"]


def test_training_figures_and_samples_render(tmp_path):
    document = training_document(tmp_path)
    samples = report.samples_block(document)
    assert samples.count("```text") == 3 and "He said 'hi'" in samples
    plt = report._pyplot()
    for build in (report.loss_curves_figure, report.loss_vs_state_figure):
        fig = build(plt, document)
        assert report._png(fig).startswith(b"\x89PNG")
        plt.close(fig)


def test_bpe_rows_follow_with_their_own_adamw_as_the_state_baseline(tmp_path):
    import copy

    char = training_document(tmp_path)
    bpe = copy.deepcopy(char)
    for r in bpe["rows"]:
        r.update(label=r["label"] + "-bpe", dataset="bpe", optimizer_state_bytes=10 * r["optimizer_state_bytes"])
    bpe["summary"] = {k + "-bpe": {**v, "optimizer_state_bytes": 10 * v["optimizer_state_bytes"]}
                      for k, v in bpe["summary"].items()}
    table = report.training_table(char, None, bpe).splitlines()
    assert table[5].startswith("| AdamW (GPT-2 BPE) |") and "| 8,000 B | 100.0% |" in table[5]
    assert table[6].startswith("| AdamSN (GPT-2 BPE) |") and "| 4,000 B | 50.0% |" in table[6]


def test_sweep_table_gives_each_ablations_whole_split_loss_where_it_has_one():
    best = dict(learning_rate=4e-2, weight_decay=0.01, final_train_loss=1.6, final_val_loss=1.8)
    rows = [dict(optimizer="adamsn", variant=None, **best),
            dict(optimizer="adamsn", variant="old", final_val_loss_whole_split=None),
            dict(optimizer="adamsn", variant="new", final_val_loss_whole_split=1.78875)]
    rows[1].pop("final_val_loss_whole_split")  # as rows written before the loss existed
    change = dict(learning_rate=4e-2, weight_decay=0.01, final_train_loss=1.7, final_val_loss=1.81,
                  val_loss_change=0.01)
    sweep = {"summary": {"best": {"adamsn": best}, "variants": {"old": change, "new": change}},
             "config": {"variant_of": "adamsn"}, "rows": rows}
    lines = report.sweep_table(sweep).splitlines()
    assert lines[-2] == "| `old` | 1.7000 | 1.8100 | +0.0100 | n/a |"
    assert lines[-1] == "| `new` | 1.7000 | 1.8100 | +0.0100 | 1.7888 |"
