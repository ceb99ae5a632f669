"""README.md, results/README.md and plots/ are exactly what the published results generate,
and the report refuses bad input before it writes anything."""

import copy
import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from bench import report
from bench.results import SCHEMA_VERSIONS

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "cpu"
README = REPO / "README.md"
RESULTS_README = REPO / "results" / "README.md"
PLOTS = REPO / "plots"


def recorded_matplotlib() -> str:
    """The matplotlib version that drew the committed figures (results/README.md says)."""
    found = re.search(r"Figures drawn with matplotlib (\S+?)\.?$",
                      RESULTS_README.read_text(encoding="utf-8"), re.MULTILINE)
    assert found, "results/README.md does not say which matplotlib drew the figures"
    return found.group(1)


@pytest.fixture(scope="module")
def committed():
    """What the report makes from the committed results: (path -> bytes, stale figures)."""
    results = report.load_results(RESULTS)
    return report.render(results, RESULTS, README, RESULTS_README, PLOTS,
                         figure_version=recorded_matplotlib())


@pytest.mark.parametrize("path", [README, RESULTS_README], ids=["README", "results-README"])
def test_readmes_match_the_committed_results(committed, path):
    outputs, _ = committed
    assert outputs[path] == path.read_bytes(), (
        f"{path.relative_to(REPO)} differs from what results/ generates: run python -m bench.report")


def test_plots_are_byte_identical_to_what_the_committed_results_draw(committed):
    import matplotlib

    if matplotlib.__version__ != recorded_matplotlib():
        pytest.skip(f"the figures were drawn with matplotlib {recorded_matplotlib()}, this is "
                    f"{matplotlib.__version__}: PNG bytes differ between versions")
    outputs, stale = committed
    made = {path.name: data for path, data in outputs.items() if path.suffix == ".png"}
    assert sorted(p.name for p in PLOTS.glob("*.png")) == sorted(made), (
        "plots/ holds other figures than results/ generates: run python -m bench.report")
    for name, png in made.items():
        assert (PLOTS / name).read_bytes() == png, (
            f"plots/{name} differs from what results/ draws: run python -m bench.report")
        assert b"tEXt" not in png and b"iTXt" not in png and b"tIME" not in png
    assert not any(p.exists() for p in stale)


def test_every_figure_is_shown_and_every_block_filled(committed):
    outputs, _ = committed
    readmes = {path: data.decode("utf-8") for path, data in outputs.items() if path.suffix == ".md"}
    for path, data in outputs.items():
        if path.suffix == ".png":
            assert any(f"]({report.os.path.relpath(path, md.parent)})" in text
                       for md, text in readmes.items()), f"no README shows plots/{path.name}"
    filled = {m.group(1) for text in readmes.values() for m in report.MARKER.finditer(text)}
    results = report.load_results(RESULTS)
    assert filled == set(report.blocks(results, str, str, "x")), "a block is in neither README"


# ---- bad input ---------------------------------------------------------------------------

@pytest.fixture
def outputs(tmp_path):
    """Copies of both READMEs and a plots directory with one figure in it."""
    readme, results_readme, plots = tmp_path / "README.md", tmp_path / "RESULTS.md", tmp_path / "plots"
    shutil.copy(README, readme)
    shutil.copy(RESULTS_README, results_readme)
    plots.mkdir()
    (plots / "loss_curves.png").write_bytes(b"previous figure")

    def run(results_dir, *extra):
        return report.cli.run(report.main, ["--results-dir", str(results_dir), "--plots-dir",
                                            str(plots), "--readme", str(readme),
                                            "--results-readme", str(results_readme), *extra])

    def snapshot():
        return {p: p.read_bytes() for p in (readme, results_readme, *sorted(plots.iterdir()))}

    return run, snapshot


def nan_in_a_loss(results):
    document = json.loads((RESULTS / "training.json").read_text())
    document["rows"][1]["final_val_loss"] = float("nan")
    (results / "training.json").write_text(json.dumps(document))  # json writes NaN
    return "training.json: field rows[1].final_val_loss is nan"


def infinity_in_a_ratio(results):
    document = json.loads((RESULTS / "optimizer_state.json").read_text())
    document["rows"][3]["ratio_to_adamw"] = float("inf")
    (results / "optimizer_state.json").write_text(json.dumps(document))
    return "optimizer_state.json: field rows[3].ratio_to_adamw is inf"


def broken_schema(results):
    (results / "kv_cache.json").write_text(json.dumps({"schema_version": 1, "suite": "kv_cache"}))
    return "kv_cache.json: missing field 'profile'"


def not_json(results):
    (results / "lr_sweep.json").write_text('{"rows": [')
    return "lr_sweep.json: not valid JSON"


def no_results_files(results):
    (results / "training.quick.json").write_text("{}")  # not a published name
    return f"results directory {results} holds no results files"


@pytest.mark.parametrize("make", [nan_in_a_loss, infinity_in_a_ratio, broken_schema, not_json,
                                  no_results_files])
def test_bad_results_stop_the_report_before_it_writes(tmp_path, outputs, capsys, make):
    run, snapshot = outputs
    results = tmp_path / "results"
    results.mkdir()
    expected = make(results)
    before = snapshot()
    assert run(results) == 2
    assert expected in capsys.readouterr().err
    assert snapshot() == before


def test_a_missing_results_directory_is_named_and_nothing_is_written(tmp_path, outputs, capsys):
    run, snapshot = outputs
    before = snapshot()
    assert run(tmp_path / "missing" / "dir") == 2
    assert f"results directory {tmp_path / 'missing' / 'dir'} does not exist" in capsys.readouterr().err
    assert snapshot() == before


def test_a_figure_that_fails_leaves_every_output_as_it_was(tmp_path, outputs, monkeypatch):
    run, snapshot = outputs
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(RESULTS / "kv_cache.json", results)  # a suite whose committed rows are current

    def fail(plt, document):
        raise RuntimeError("drawing failed")

    suite, _, alt = report.FIGURES["decode_time.png"]
    monkeypatch.setitem(report.FIGURES, "decode_time.png", (suite, fail, alt))
    before = snapshot()
    with pytest.raises(RuntimeError, match="drawing failed"):
        run(results)
    assert snapshot() == before
    assert sorted(p.name for p in tmp_path.joinpath("plots").iterdir()) == ["loss_curves.png"]


def test_a_write_that_fails_midway_leaves_every_target_as_it_was(tmp_path, monkeypatch):
    targets = [tmp_path / "a.md", tmp_path / "b.png", tmp_path / "c.png"]
    for path in targets[:2]:
        path.write_bytes(b"old")
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(report.os, "fsync", fsync)
    with pytest.raises(OSError, match="disk full"):
        report.publish({path: b"new" for path in targets}, [targets[0]])
    assert [p.read_bytes() for p in targets[:2]] == [b"old", b"old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.md", "b.png"]  # no temporaries


def test_a_readme_without_its_block_names_the_unknown_one():
    with pytest.raises(ValueError, match="unknown results block 'kv-tabel'"):
        report.render_markdown("<!-- results:kv-tabel -->\n<!-- /results:kv-tabel -->",
                               {"kv-shapes": ""})


# ---- suites whose committed file predates their current rows -----------------------------

ENVIRONMENT = {"utc_time": "2026-01-01T00:00:00+00:00", "git_commit": None, "git_dirty": None,
               "torch": "2.13.0", "cpu": "a CPU", "torch_threads": 2}


def decode_document(new_rows: bool):
    """A kv_cache results file; with ``new_rows`` in the suite's current format."""
    from bench.test_kv_cache import summarize

    rows = []
    for dtype in ("torch.float32", "torch.bfloat16"):
        for n_kv_head in (32, 8, 1):
            for attention, slowdown in (("folded", 1.0), ("sdpa_gqa", 1.5)):
                layers = 128 // n_kv_head
                seconds = slowdown * 1e-3 * (n_kv_head / 32 + 0.01) * layers
                row = dict(test=f"test_decode[H32-kv{n_kv_head}-{attention}]", n_head=32,
                           n_kv_head=n_kv_head, seq_len=1024, dtype=dtype, head_dim=128,
                           analytic_bytes=2**27, live_bytes=2**27, median_s=seconds)
                if new_rows:
                    row.update(attention=attention, n_layer=layers, layer_bytes=2**27 // layers,
                               llc_bytes=2**25, llc_source="sysfs", bytes_read_per_token=2**27,
                               time_per_token_s=seconds, time_per_layer_s=seconds / layers,
                               gb_per_s=2**27 / seconds / 1e9)
                elif attention == "sdpa_gqa":
                    continue
                rows.append(row)
    rows.append(dict(test="test_model_shape_bytes_per_token[m]", model="m", n_layer=2, n_head=4,
                     n_kv_head=1, head_dim=8, bytes_per_token=64, fraction_of_mha=0.25,
                     gib_per_32k_context=64 * 32768 / 2**30))
    summary = summarize(rows) if new_rows else {"decode_speedup_vs_mha": []}
    return {"rows": rows, "summary": summary, "profile": "full", "environment": ENVIRONMENT,
            "suite": "kv_cache", "schema_version": SCHEMA_VERSIONS["kv_cache"] - (not new_rows)}


def step_document(new_rows: bool, peers: bool = False):
    """A step_time results file; with ``new_rows`` in the suite's current format (else in
    one older than the report shows), with
    ``peers`` also GaLore (a projector refreshed every 200 steps) on the baby model only and
    Muon timed on one block of GPT-2 small's shapes."""
    from bench.test_step_time import SUMMARY_KEYS, summarize

    if not new_rows:
        entries = {name: {"ratio_to_adamw_fused": r, "ratio_to_adamw_foreach": r / 3,
                          "fraction_of_floor": 0.5, "interleaved_median_s": r * 1e-3,
                          "kernels": {"step": "fused C++"}}
                   for name, r in (("adamw", 1.0), ("adamsn", 0.8), ("adamw_foreach", 3.0))}
        return {"summary": {"baby": entries, "gpt2-124M": copy.deepcopy(entries)}, "rows": [],
                "profile": "full", "environment": ENVIRONMENT, "suite": "step_time",
                "schema_version": SCHEMA_VERSIONS["step_time"] - 1}

    def row(model, name, r, refresh=None, compile_s=None, timed=None):
        median = r * 1e-3
        amortized = median if refresh is None else median + (refresh[1] - median) / refresh[0]
        row = dict(test=f"test_step_time[{model}-{name}]", model=model, optimizer=name,
                   peer=name in report.PEER_NAMES, timed_shapes=timed or model,
                   shape_note=None if timed is None else f"timed on {timed}: too slow",
                   interleaved_median_s=median, ratio_to_adamw=r, ratio_to_adamw_foreach=r / 3,
                   fraction_of_floor=0.5, kernels="torch", first_step_s=0.5,
                   compile_s=compile_s, refresh_interval=None if refresh is None else refresh[0],
                   refresh_step_median_s=None if refresh is None else refresh[1],
                   refresh_ratio_to_adamw=None if refresh is None else refresh[1] / 1e-3,
                   amortized_median_s=amortized, amortized_ratio_to_adamw=amortized / 1e-3,
                   state_bytes=100)
        assert set(SUMMARY_KEYS) <= set(row)
        return row

    rows = []
    for model in ("baby", "gpt2-124M"):
        rows += [row(model, "adamw", 1.0), row(model, "adamsn", 0.8),
                 row(model, "adamw_foreach", 3.0)]
    if peers:
        rows += [row("baby", "galore_adamw", 2.0, refresh=(200, 0.2), compile_s=None),
                 row("baby", "torchao_adamw8bit", 1.5, compile_s=40.0),
                 row("gpt2-124M", "torch_muon", 30.0, timed="gpt2-124M, 1 of 12 blocks")]
    return {"summary": summarize(rows), "rows": rows, "profile": "full",
            "environment": ENVIRONMENT, "suite": "step_time", "seeds": [1337], "config": {},
            "schema_version": SCHEMA_VERSIONS["step_time"]}


@pytest.mark.parametrize("suite, make, block", [
    ("kv_cache", decode_document, "decode"),
    ("step_time", step_document, "step-time"),
])
def test_older_rows_are_shown_as_not_yet_measured_and_current_ones_render(suite, make, block):
    old = report.blocks({suite: make(False)}, str, str, "x")
    assert old[block].startswith("_Not yet measured with this suite's current rows: run "
                                 f"`python -m pytest bench/test_{suite}.py --benchmark-only")
    assert report.figures({suite: make(False)}) == {}
    new = report.blocks({suite: make(True)}, str, str, "x")
    assert new[block].startswith("| ") and "Not yet measured" not in new[block]
    pngs = report.figures({suite: make(True)})
    assert len(pngs) == 1 and next(iter(pngs.values())).startswith(b"\x89PNG")


def test_current_decode_rows_give_each_paths_time_against_mha():
    table = report.blocks({"kv_cache": decode_document(True)}, str, str, "x")["decode"]
    mqa = next(line for line in table.splitlines() if line.startswith("| float32 | 1024 | 1 |"))
    assert "| 128 | 128 MiB |" in mqa and mqa.endswith("| 0.031 |")
    assert "GQA and MQA points each path decodes faster" in table
    assert "`folded` 2, `sdpa_gqa` 0" in table


def test_step_time_headline_takes_the_ratio_to_fused_adamw(tmp_path):
    results = {"training": training_document(), "step_time": step_document(True)}
    headline = report.blocks(results, str, str, "x")["headline"]
    adamsn = next(line for line in headline.splitlines() if line.startswith("| AdamSN |"))
    assert adamsn.endswith("| 50.0% | 0.80x | 0.80x | not yet measured |")
    results["step_time"] = step_document(False)
    headline = report.blocks(results, str, str, "x")["headline"]
    assert "Step time: not yet measured" in headline


# ---- tables from a small training document ----------------------------------------------

def training_document():
    """A small training results file in the suite's own format, run through its summary."""
    from bench.results import environment, results_document
    from bench.test_training import summarize
    from memeff.train import TrainConfig

    def row(label, optimizer, n_kv_head, seed, val, state, whole_split=True):
        evals = [{"iter": it, "train_loss": val + 1 / (it + 1), "val_loss": val + 1 / (it + 2)}
                 for it in (0, 5, 10)]
        return dict(test=f"test_training[{label}]", label=label, optimizer=optimizer, n_head=4,
                    n_kv_head=n_kv_head, dataset="char", seed=seed, max_iters=10, warmup_iters=100,
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
    config = {"base": dataclasses.asdict(TrainConfig()), "max_iters": 10,
              "sample": dict(prompt="ROMEO:", max_new_tokens=5, temperature=0.8, top_k=200, seed=1),
              "hparams": {"adamw": tuned, "adamsn": tuned},
              "runs": {label: {"hparams": dict(tuned)} for label in ("adamw", "adamsn", "adamw-mqa1")}}
    document = results_document("training", "full", environment(), [1, 2], config, rows)
    document["summary"] = summarize(rows)
    return document


def test_training_table_gives_mean_half_spread_and_share_of_adamw():
    table = report.training_block(training_document(), None, str).splitlines()
    adamw = report.label("adamw")
    assert table[2].startswith(f"| {adamw} | 0.003 / 0.1 | 2 | 2.0000 ± 0.1000 | 2.1000 ± 0.1000 "
                               "| 2.1150 ± 0.1050 | 800 B | 100.0% | 100% |")
    assert table[3].startswith("| AdamSN | 0.003 / 0.1 | 2 | 2.0000 ± 0.0000 | 2.1000 ± 0.0000 "
                               "| 2.1150 ± 0.0050 | 400 B | 50.0% |")
    assert table[4] == (f"| {adamw}, MQA, 1 K/V head | 0.003 / 0.1 | 2 | 2.2000 ± 0.0000 "
                        "| 2.3000 ± 0.0000 | n/a | 700 B | 87.5% | 25% |")


def test_headline_has_a_row_per_optimizer_and_per_attention_layout():
    headline = report.blocks({"training": training_document()}, str, str, "x")["headline"]
    lines = headline.splitlines()
    assert lines[2] == (f"| {report.label('adamw')} | 2.1150 ± 0.1050 | 100.0% | not yet measured "
                        "| not yet measured |")
    assert lines[3] == "| AdamSN | 2.1150 ± 0.0050 | 50.0% | not yet measured | not yet measured |"
    assert "| MHA | 4 of 4 | 2.1150 ± 0.1050 | 100% |" in lines
    assert "| MQA, 1 K/V head | 1 of 4 | 2.3000 ± 0.0000 | 25% |" in lines  # 20-batch: no whole split


def test_paired_gaps_compare_each_run_with_adamw_at_the_same_seed():
    gaps = report.paired_gaps_block(training_document()).splitlines()
    assert gaps[2] == "| AdamSN | 0.0000 | 1: +0.1000, 2: -0.1000 |"
    assert len(gaps) == 3  # the MQA run has no whole-split loss to pair


def test_a_run_with_another_warmup_is_named_and_kept_out_of_the_figures():
    document = training_document()
    for r in document["rows"]:
        if r["label"] == "adamsn":
            r["label"], r["warmup_iters"] = "adamsn-warmup200", 200
    document["summary"] = {("adamsn-warmup200" if k == "adamsn" else k): v
                           for k, v in document["summary"].items()}
    runs = document["config"]["runs"]
    runs["adamsn-warmup200"] = {"hparams": {**runs.pop("adamsn")["hparams"], "warmup_iters": 200}}
    table = report.training_block(document, None, str).splitlines()
    assert table[3].startswith("| AdamSN, 200 warmup iterations | 0.003 / 0.1 | 2 |")
    assert report.headline_labels(document) == ["adamw", "adamw-mqa1"]


def test_a_run_at_another_lr_is_kept_out_of_the_figures():
    document = training_document()
    document["config"]["runs"]["adamsn"]["hparams"]["learning_rate"] = 6e-3
    assert report.headline_labels(document) == ["adamw", "adamw-mqa1"]


def test_training_figures_and_samples_render():
    document = training_document()
    samples = report.samples_block(document)
    assert samples.count("```text") == 3 and "He said 'hi'" in samples
    pngs = report.figures({"training": document})
    assert sorted(pngs) == ["loss_curves.png", "loss_vs_state.png"]


def test_bpe_rows_follow_with_their_own_adamw_as_the_state_baseline():
    char = training_document()
    bpe = copy.deepcopy(char)
    for r in bpe["rows"]:
        r.update(label=r["label"] + "-bpe", dataset="bpe", optimizer_state_bytes=10 * r["optimizer_state_bytes"])
    bpe["summary"] = {k + "-bpe": {**v, "optimizer_state_bytes": 10 * v["optimizer_state_bytes"]}
                      for k, v in bpe["summary"].items()}
    table = report.training_block(char, bpe, str).splitlines()
    assert table[5].startswith(f"| {report.label('adamw')}, GPT-2 BPE |") and "| 8,000 B | 100.0% |" in table[5]
    assert table[6].startswith("| AdamSN, GPT-2 BPE |") and "| 4,000 B | 50.0% |" in table[6]


def test_ablations_give_each_changes_whole_split_loss_where_it_has_one():
    best = dict(learning_rate=4e-2, weight_decay=0.01, final_train_loss=1.6, final_val_loss=1.8)
    rows = [dict(optimizer="adamsn", variant=None, **best),
            dict(optimizer="adamsn", variant="old", git_commit="a" * 40),
            dict(optimizer="adamsn", variant="new", git_commit="b" * 40,
                 final_val_loss_whole_split=1.78875)]
    change = dict(learning_rate=4e-2, weight_decay=0.01, final_train_loss=1.7, final_val_loss=1.81,
                  val_loss_change=0.01)
    sweep = {"summary": {"best": {"adamsn": best}, "variants": {"old": change, "new": change}},
             "config": {"variant_of": "adamsn", "base": {"eval_iters": 20}}, "rows": rows}
    lines = report.ablations_block(sweep).splitlines()
    assert lines[-2] == "| `old` | `aaaaaaa` | 1.7000 | 1.8100 | +0.0100 | n/a |"
    assert lines[-1] == "| `new` | `bbbbbbb` | 1.7000 | 1.8100 | +0.0100 | 1.7888 |"


def test_a_ratio_over_zero_is_an_error_naming_what_it_is():
    with pytest.raises(ValueError, match="training adamsn state: division by zero"):
        report.ratio(1, 0, "training adamsn state")


# ---- --compare ----------------------------------------------------------------------------

def test_compare_prints_your_results_beside_the_published_spread_and_writes_nothing(tmp_path, capsys):
    from bench.test_training import summarize
    from memeff.io import write_json

    published, yours = tmp_path / "published", tmp_path / "yours"
    published.mkdir()
    yours.mkdir()
    write_json(published / "training.json", training_document())
    mine = training_document()
    mine["profile"], mine["seeds"] = "default", [1]
    mine["rows"] = [r for r in mine["rows"] if r["seed"] == 1]
    mine["rows"][1]["final_val_loss_whole_split"] = 3.0  # adamsn, far outside
    mine["summary"] = summarize(mine["rows"])
    write_json(yours / "training.default.json", mine)
    before = sorted(tmp_path.rglob("*"))

    assert report.cli.run(report.main, ["--compare", str(yours), "--results-dir", str(published)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"adamw: final_val_loss_whole_split\s+2\.0100\s+2\.1150\s+2\.0100 to 2\.2200\s+inside", out)
    assert re.search(r"adamsn: final_val_loss_whole_split\s+3\.0000\s+2\.1150\s+2\.1100 to 2\.1200\s+outside", out)
    assert sorted(tmp_path.rglob("*")) == before

    mine["config"]["max_iters"] = 200
    write_json(yours / "training.default.json", mine)
    report.cli.run(report.main, ["--compare", str(yours), "--results-dir", str(published)])
    assert "not comparable: 200 iterations against 10" in capsys.readouterr().out


def test_compare_without_quick_or_default_results_exits_2(tmp_path, capsys):
    assert report.cli.run(report.main, ["--compare", str(tmp_path), "--results-dir", str(RESULTS)]) == 2
    assert f"{tmp_path} holds no results to compare" in capsys.readouterr().err


# ---- the sharded (FSDP2) suite -------------------------------------------------------------

def sharded_document():
    """A sharded results file in the suite's own format: AdamW halves its state on 2 ranks,
    torch's Adafactor fails there."""
    from bench.results import environment, results_document
    from bench.test_sharded import ShardedRow, classify, suite_config, summarize

    def row(name, world_size, state, error=None):
        works = error is None

        def each(value):  # one value per rank; None where it fails
            return [value] * world_size if works else None

        made = dataclasses.asdict(ShardedRow(
            model="baby", n_params=804_096, optimizer=name, world_size=world_size,
            backend="gloo" if world_size > 1 else "none", batch_per_rank=2, block_size=64,
            threads_per_rank=1, cpu_cores=2, works=works, error=error,
            kernels="torch" if works else None, state_bytes_per_rank=each(state),
            analytic_state_bytes_per_rank=each(state), before_step_bytes_per_rank=each(2**28),
            step_peak_bytes_per_rank=each(2**28 + 2**20),
            step_peak_method="cpu VmHWM" if works else None,
            collective_share_per_rank=each(0.25 * (world_size - 1)), collective_method="profiler",
            interleaved_rounds=3, step_median_s_per_rank=each(0.01 * world_size),
            one_process_median_s_per_rank=each(0.01), step_time_ratio=world_size if works else None,
            equivalence_steps=3, max_param_rel_diff=1e-7 * (world_size - 1) if works else None,
            max_update_rel_diff=1e-6 * (world_size - 1) if works else None,
            micro_batch_rel_diff=5e-8 * (world_size - 1) if works else None))
        return {**made, "classification": classify(made)}

    rows = [row("adamw", 1, 2**21), row("adamw", 2, 2**20),
            row("torch_adafactor", 1, 2**10),
            row("torch_adafactor", 2, None, error="RuntimeError: `no`")]
    document = results_document("sharded", "full", environment(), [1337], suite_config("quick"),
                                rows)
    document["summary"] = summarize(rows)
    return document


def test_sharded_rows_give_a_table_a_figure_and_the_headline_column():
    results = {"training": training_document(), "sharded": sharded_document()}
    made = report.blocks(results, str, str, "x")
    lines = made["sharded"].splitlines()
    assert lines[3] == ("| baby | AdamW (torch, fused) | 2 | 1.00 MiB | 50.0% | 257 MiB | 20 | 2.00x "
                        "| 25% | 1.0e-07 | 5.0e-08 | exact |")
    assert lines[5] == "| baby | Adafactor (torch) | 2 | " + "n/a | " * 8 + "fails |"
    assert "Adafactor (torch) fails under FSDP2: `RuntimeError: 'no'`" in made["sharded"]
    adamw = next(line for line in made["headline"].splitlines() if line.startswith("| AdamW"))
    assert adamw.endswith("| 100.0% | not yet measured | yes, exact to 1e-07 |")
    assert "Under FSDP2: the largest relative difference of a parameter" in made["headline"]
    pngs = report.figures({"sharded": sharded_document()})
    assert sorted(pngs) == ["sharded_state.png"] and pngs["sharded_state.png"].startswith(b"\x89PNG")


def test_without_the_sharded_file_its_block_and_column_say_how_to_measure_it():
    made = report.blocks({"training": training_document()}, str, str, "x")
    command = "python -m pytest bench/test_sharded.py --benchmark-only --profile full"
    assert made["sharded"] == f"_Not yet published: run `{command}`._"
    assert f"Under FSDP2: not yet published: run `{command}`." in made["headline"]
    assert report.figures({"training": training_document()}).keys() == {
        "loss_curves.png", "loss_vs_state.png"}


def test_a_sharded_file_with_a_bad_field_is_named(tmp_path):
    document = sharded_document()
    document["rows"][1]["state_bytes_per_rank"][0] = "1"
    path = tmp_path / "sharded.json"
    path.write_text(json.dumps(document))
    message = r"rows\[1\]\.state_bytes_per_rank\[0\] is '1', not an integer"
    with pytest.raises(ValueError, match=message):
        report.read_checked(path)


# ---- the peers (other packages' optimizers) beside ours -----------------------------------

def peers_document(max_iters: int = 10):
    """A training_peers results file: GaLore and Adam-mini at seeds 1 and 2 (as
    training_document's), in the suite's own format."""
    from bench.results import environment, results_document
    from bench.test_training import summarize

    document = training_document()
    rows = []
    for name, val, state in (("galore_adamw", 2.05, 600), ("adam_mini", 2.3, 420)):
        for seed in (1, 2):
            rows.append({**document["rows"][seed - 1], "test": f"test_training_peers[{name}]",
                         "label": name, "optimizer": name, "final_val_loss": val,
                         "final_val_loss_whole_split": val + 0.02 * seed,
                         "optimizer_state_bytes": state, "max_iters": max_iters})
    config = copy.deepcopy(document["config"])
    config["max_iters"] = max_iters
    config["hparams"].update({name: dict(config["hparams"]["adamw"])
                              for name in ("galore_adamw", "adam_mini")})
    config["runs"] = {name: {"hparams": dict(config["hparams"]["adamw"])}
                      for name in ("galore_adamw", "adam_mini")}
    peers = results_document("training_peers", "full", environment(), [1, 2], config, rows)
    peers["summary"] = summarize(rows)
    return peers


def test_peers_training_rows_follow_ours_with_their_state_against_our_adamw():
    lines = report.training_block(training_document(), None, str, peers_document()).splitlines()
    assert lines[5].startswith("| *GaLore AdamW* | 0.003 / 0.1 | 2 |")
    assert "| 2.0800 ± 0.0100 | 600 B | 75.0% | 100% |" in lines[5]
    assert lines[6].startswith("| *Adam-mini* |") and "| 420 B | 52.5% |" in lines[6]


def test_peers_are_paired_with_adamw_at_the_same_seed_when_their_runs_compare():
    gaps = report.paired_gaps_block(training_document(), peers_document()).splitlines()
    # GaLore: 2.07 - 2.01 at seed 1, 2.09 - 2.22 at seed 2
    assert "| *GaLore AdamW* | -0.0350 | 1: +0.0600, 2: -0.1300 |" in gaps
    assert "| *Adam-mini* | +0.2150 | 1: +0.3100, 2: +0.1200 |" in gaps
    short = report.paired_gaps_block(training_document(), peers_document(max_iters=5))
    assert "GaLore" not in short
    assert ("Peers (other packages' optimizers) not paired: their runs are of 5 iterations "
            "against 10; run `python -m pytest bench/test_training_peers.py") in short


def test_headline_has_a_row_per_peer_with_what_is_missing_said():
    results = {"training": training_document(), "training_peers": peers_document(),
               "step_time": step_document(True, peers=True), "sharded": sharded_document()}
    lines = report.blocks(results, str, str, "x")["headline"].splitlines()
    galore = next(line for line in lines if line.startswith("| *GaLore AdamW* |"))
    # the refresh amortized: 2 ms + (200 ms - 2 ms) / 200; not timed on GPT-2; not sharded
    assert galore == "| *GaLore AdamW* | 2.0800 ± 0.0100 | 75.0% | 2.99x | n/a | n/a |"
    muon = next(line for line in lines if line.startswith("| *Muon + AdamW (torch)* |"))
    assert muon == "| *Muon + AdamW (torch)* | n/a | n/a | n/a | 30.00x† | n/a |"
    headline = "\n".join(lines)
    assert "†: timed on gpt2-124M, 1 of 12 blocks" in headline
    assert "Peers (other packages' optimizers" in headline and "in italics" in headline

    short = report.blocks({**results, "training_peers": peers_document(max_iters=5)},
                          str, str, "x")
    assert ("| *GaLore AdamW* | 2.0800 ± 0.0100 (5 iterations against 10) | 75.0% |"
            in short["headline"])
    assert "their training runs are of 5 iterations against 10, not comparable" in short["headline"]
    assert "Their runs are of 5 iterations against 10: not comparable with ours." in short["training"]

    del results["training_peers"]
    missing = report.blocks(results, str, str, "x")["headline"]
    assert "| *GaLore AdamW* | not yet measured | not yet measured | 2.99x | n/a | n/a |" in missing
    assert ("their training runs: not yet published: run `python -m pytest "
            "bench/test_training_peers.py --benchmark-only --profile full`.") in missing
    assert "Adam-mini" not in missing  # measured nowhere


def test_training_and_gap_blocks_say_when_the_peers_are_not_published():
    made = report.blocks({"training": training_document()}, str, str, "x")
    for block in ("training", "paired-gaps"):
        assert made[block].endswith("Peers' training runs: not yet published: run `python -m "
                                    "pytest bench/test_training_peers.py --benchmark-only "
                                    "--profile full`.")


def test_step_block_shows_peers_their_shapes_refreshes_and_compiles_apart():
    block = report.blocks({"step_time": step_document(True, peers=True)}, str, str, "x")["step-time"]
    lines = block.splitlines()
    assert "| baby | *GaLore AdamW* | 2.00 | 2.00x | 0.67x | 2.99x | 50% | torch |" in lines
    assert "| baby | AdamSN | 0.80 | 0.80x | 0.27x |  | 50% | torch |" in lines
    assert any(line.startswith("| gpt2-124M, 1 of 12 blocks | *Muon + AdamW (torch)* | 30.00 |")
               for line in lines)
    assert ("Muon + AdamW (torch) on gpt2-124M: timed on gpt2-124M, 1 of 12 blocks: too slow."
            in lines)
    once = lines[lines.index(next(line for line in lines if line.startswith("One-off costs"))) + 4:]
    assert once[0] == "| baby | *AdamW 8-bit (torchao)* | 0.50 | 40.00 | n/a | n/a | n/a |"
    assert once[1] == "| baby | *GaLore AdamW* | 0.50 | n/a | 200 | 200.0 | 200.0x |"


def test_the_step_figure_keeps_peers_timed_on_one_model_only():
    document = step_document(True, peers=True)
    plt = report._pyplot()
    fig = report.step_time_figure(plt, document)
    try:
        fig.canvas.draw()
        names = [t.get_text() for t in fig.axes[0].get_yticklabels()]
        assert "GaLore AdamW" in names and "Muon + AdamW (torch)" in names
        texts = [t.get_text() for t in fig.axes[1].texts]
        assert "not timed in this profile" in texts  # GaLore on GPT-2 small
        assert "30.00x†" in texts
    finally:
        plt.close(fig)


def state_document(peer_shapes=((512, 512),)):
    """An optimizer_state results file: ours over three shapes, two peers over ``peer_shapes``."""
    rows = []
    for shape in ((128, 128), (512, 512), (768,)):
        for name, share in (("adamw", 1.0), ("adamsn", 0.5), ("adafactor", 0.01)):
            rows.append(dict(shape=list(shape), optimizer=name, dtype="torch.float32",
                             ratio_to_adamw=share, live_bytes=8, analytic_bytes=8))
    for shape in peer_shapes:
        for name, share in (("bnb_adamw8bit", 0.25), ("lion_pytorch", 0.5)):
            rows.append(dict(shape=list(shape), optimizer=name, dtype="torch.float32",
                             ratio_to_adamw=share, live_bytes=8, analytic_bytes=8))
    return {"rows": rows, "suite": "optimizer_state", "profile": "quick",
            "environment": ENVIRONMENT, "schema_version": SCHEMA_VERSIONS["optimizer_state"]}


def test_state_block_puts_ours_and_the_peers_in_two_narrow_tables():
    lines = report.state_block(state_document(), str).splitlines()
    assert lines[0] == "| optimizer | 128x128 | 512x512 | 768 |"
    assert lines[3] == "| AdamSN | 50.00% | 50.00% | 50.00% |"
    peers = lines.index("Peers (other packages' optimizers):")
    assert lines[peers + 2] == "| optimizer | 512x512 |"  # the shapes the peers were measured on
    assert lines[peers + 4] == "| AdamW 8-bit (bitsandbytes) | 25.00% |"
    assert lines[peers + 5] == "| Lion (lion-pytorch) | 50.00% |"
    assert "Peers" not in report.state_block(state_document(peer_shapes=()), str)


def test_pareto_front_keeps_the_points_no_other_beats_on_both():
    points = [(1.0, 3.0), (2.0, 2.0), (2.0, 2.5), (4.0, 2.0), (8.0, 1.0), (0.5, 4.0), (1.0, 3.0)]
    assert report.pareto_front(points) == [5, 0, 6, 1, 4]  # ties with each other both kept


def test_loss_vs_state_draws_the_peers_and_the_frontier():
    plt = report._pyplot()
    fig = report.loss_vs_state_figure(plt, training_document(), peers_document())
    try:
        ax = fig.axes[0]
        names = {t.get_text(): t for t in ax.texts}
        assert {"GaLore AdamW", "Adam-mini", "AdamSN"} <= set(names)
        # state 400 B (2.115) < 420 B (2.33) < 600 B (2.08) < 800 B (2.115): AdamSN and GaLore
        assert names["AdamSN"].get_fontweight() == "bold"
        assert names["GaLore AdamW"].get_fontweight() == "bold"
        assert names["Adam-mini"].get_fontweight() == "normal"
        assert names["Adam-mini"].get_fontstyle() == "italic"
        assert any("Pareto frontier" in t.get_text() for t in ax.get_legend().get_texts())
    finally:
        plt.close(fig)
    pngs = report.figures({"training": training_document(), "training_peers": peers_document()})
    assert pngs["loss_vs_state.png"] != report.figures({"training": training_document()})["loss_vs_state.png"]


@pytest.mark.parametrize("entry, cell", [
    (dict(classification="exact", max_param_rel_diff=1e-7), "yes, exact to 1e-07"),
    (dict(classification="runs but differs", max_param_rel_diff=3e-3), "runs, but off by 3e-03"),
    (dict(classification="fails", error="torch.distributed.DistStoreError: `x` timed out"),
     "no: fails (DistStoreError)"),
    (dict(classification="fails", error="the step raised on rank 1"),
     "no: fails (the step raised on ...)"),
], ids=["exact", "differs", "fails", "fails-without-a-type"])
def test_fsdp_cell_gives_each_outcome(entry, cell):
    sharded = {"summary": {"apollo": {"world_sizes": [2, 3], **entry}}, "rows": []}
    assert report.fsdp_cell(sharded, "apollo") == cell
    assert report.fsdp_cell(sharded, "lion_pytorch") == "n/a"  # not in the sharded file
    assert report.fsdp_cell(None, "apollo") == "not yet measured"


def test_a_training_peers_file_with_a_bad_field_is_named(tmp_path):
    from memeff.io import write_json

    document = peers_document()
    document["rows"][0]["optimizer"] = "adam_maxi"
    write_json(tmp_path / "training_peers.json", document)
    with pytest.raises(ValueError, match=r"training_peers\.json: field rows\[0\]\.optimizer is "
                                         r"'adam_maxi', not an optimizer name"):
        report.load_results(tmp_path)


def test_a_step_row_with_a_bad_peer_field_is_named(tmp_path):
    from bench.results import environment
    from memeff.io import write_json

    document = step_document(True, peers=True)
    document["environment"] = environment()
    document["rows"][-1]["timed_shapes"] = 12
    write_json(tmp_path / "step_time.json", document)
    with pytest.raises(ValueError, match=r"step_time\.json: field rows\[8\]\.timed_shapes is 12, "
                                         r"not a string"):
        report.load_results(tmp_path)


def test_sharded_rows_say_each_outcome_and_which_formulas_differ():
    document = sharded_document()
    peer = {**document["rows"][1], "optimizer": "apollo", "world_size": 3,
            "max_param_rel_diff": 4e-3, "classification": "runs but differs",
            "state_formula_holds": False}
    document["rows"].append(peer)
    document["summary"]["apollo"] = {"works": True, "exact": False, "error": None,
                                     "classification": "runs but differs",
                                     "max_param_rel_diff": 4e-3, "micro_batch_rel_diff": 5e-8,
                                     "world_sizes": [3]}
    made = report.blocks({"training": training_document(), "sharded": document}, str, str, "x")
    apollo = next(line for line in made["sharded"].splitlines() if "| *APOLLO* |" in line)
    assert apollo.startswith("| baby | *APOLLO* | 3 |") and apollo.endswith("| runs but differs |")
    assert "live state tensors differ from the formula: APOLLO.**" in made["sharded"]
    assert "| 1 |" in made["sharded"] and "| one process |" in made["sharded"]
    document["summary"]["apollo"]["classification"] = "almost"
    with pytest.raises(ValueError, match=r"summary\.apollo\.classification is 'almost', not one "
                                         r"of exact, runs but differs, fails"):
        report.check_fields(document, report.READ_FIELDS["sharded"], "sharded.json")


def test_peers_compare_unless_the_problem_differs_not_the_optimizers_settings():
    training, peers = training_document(), peers_document()
    peers["config"]["base"].update(beta2=None, parallel="ddp", learning_rate=1.0)
    assert report.not_comparable(training, peers) is None
    peers["config"]["base"]["batch_size"] = 64
    assert report.not_comparable(training, peers) == "other settings (batch_size)"


def test_the_lr_sweep_figure_wraps_the_peers_panels_onto_more_rows():
    names = ["adamw", "adamsn", "adamsnsm", "adafactor", "torch_adafactor", "apollo", "torch_muon"]
    rows = [dict(optimizer=name, learning_rate=lr, weight_decay=0.1, final_val_loss=2.0 + lr)
            for name in names for lr in (1e-3, 1e-2)]
    best = {name: dict(learning_rate=1e-3, weight_decay=0.1, final_train_loss=1.9,
                       final_val_loss=2.001) for name in names}
    sweep = {"rows": rows, "summary": {"best": best},
             "config": {"max_iters": 10, "base": {"eval_iters": 20}}}
    plt = report._pyplot()
    fig = report.lr_sweep_figure(plt, sweep)
    try:
        shown = [ax for ax in fig.axes if ax.get_visible()]
        assert [ax.get_title() for ax in shown] == [report.label(n) for n in names]
        assert len(fig.axes) == 2 * report.LR_SWEEP_COLUMNS
        assert shown[5].get_title() == "APOLLO" and shown[5].title.get_fontstyle() == "italic"
        assert fig.get_size_inches()[0] <= 3.0 * report.LR_SWEEP_COLUMNS
    finally:
        plt.close(fig)


def test_point_labels_are_placed_clear_of_each_other():
    plt = report._pyplot()
    fig, ax = plt.subplots(figsize=(4, 3))
    try:
        ax.set_xlim(0, 10)
        ax.set_ylim(0, 10)
        labels = [(5, 5, "first label"), (5, 5, "second label"), (5.1, 5, "third"), (1, 9, "far")]
        offsets = report.label_offsets(ax, labels, fontsize=7)
        assert offsets[3] == (6, report.LABEL_RISE)  # alone: beside its point
        rows = [dy for _, dy in offsets[:3]]
        assert len(set(rows)) == 3 and min(abs(a - b) for a in rows for b in rows if a != b) >= 9
    finally:
        plt.close(fig)
