"""Bad results files and unwritable outputs stop ``python -m bench.report`` with one line
naming the file and field (or the path), exit code 2, and nothing written."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from bench import report
from bench.results import SCHEMA_VERSIONS

REPO = Path(__file__).resolve().parents[1]


def without(*path):
    """A change to a results document: the field at ``path`` removed."""
    def change(document):
        *parents, last = path
        for key in parents:
            document = document[key]
        del document[last]
    return change


def setting(value, *path):
    """A change to a results document: the field at ``path`` set to ``value``."""
    def change(document):
        *parents, last = path
        for key in parents:
            document = document[key]
        document[last] = value
    return change


BAD_RESULTS = [  # (suite, change to its document or the file's new bytes, what the error
                 # says after "<file>: ")
    pytest.param("training", without("summary"), r"field summary is missing",
                 id="no-summary"),
    pytest.param("training", without("rows", 0, "learning_rate"),
                 r"field rows\[0\]\.learning_rate is missing", id="row-without-lr"),
    pytest.param("lr_sweep", without("rows", 5, "learning_rate"),
                 r"field rows\[5\]\.learning_rate is missing", id="sweep-row-without-lr"),
    pytest.param("kv_cache", without("summary"), r"field summary is missing",
                 id="kv-cache-no-summary"),
    pytest.param("training", setting("adamx", "rows", 0, "optimizer"),
                 r"field rows\[0\]\.optimizer is 'adamx', not an optimizer name \(adamw, ",
                 id="unknown-optimizer"),
    pytest.param("optimizer_state", setting("adamx", "rows", 0, "optimizer"),
                 r"field rows\[0\]\.optimizer is 'adamx', not an optimizer name",
                 id="unknown-optimizer-in-state-rows"),
    pytest.param("lr_sweep", setting({"learning_rate": 3e-3, "weight_decay": 0.1,
                                      "final_train_loss": 1.6, "final_val_loss": 1.8},
                                     "summary", "best", "adamx"),
                 r"field summary\.best\.adamx is 'adamx', not an optimizer name",
                 id="unknown-optimizer-as-a-key"),
    pytest.param("step_time", setting("0.5", "summary", "baby", "adamsn", "ratio_to_adamw"),
                 r"field summary\.baby\.adamsn\.ratio_to_adamw is '0\.5', not a number",
                 id="string-ratio"),
    pytest.param("optimizer_state", setting(True, "rows", 3, "ratio_to_adamw"),
                 r"field rows\[3\]\.ratio_to_adamw is True, not a number", id="bool-ratio"),
    pytest.param("training", setting("1.8", "rows", 2, "final_val_loss"),
                 r"field rows\[2\]\.final_val_loss is '1\.8', not a number", id="string-loss"),
    pytest.param("step_time",
                 setting(float("nan"), "summary", "baby", "adamsn", "ratio_to_adamw"),
                 r"field summary\.baby\.adamsn\.ratio_to_adamw is nan", id="nan-ratio"),
    pytest.param("kv_cache", setting([1, 2], "summary"),
                 r"field summary is \[1, 2\], not an object", id="summary-not-an-object"),
    pytest.param("kv_cache", b'{"suite": "kv_cache \xff"}', r"not UTF-8 text", id="not-utf-8"),
]


@pytest.fixture
def report_into(tmp_path):
    """``run(results_dir)``: the report's CLI with every output under ``tmp_path/out``;
    ``snapshot()``: every file there, with its bytes."""
    out = tmp_path / "out"
    (out / "plots").mkdir(parents=True)
    shutil.copy(REPO / "README.md", out / "README.md")
    shutil.copy(REPO / "results" / "README.md", out / "RESULTS.md")
    (out / "plots" / "loss_curves.png").write_bytes(b"previous figure")

    def run(results_dir, plots_dir=out / "plots", readme=out / "README.md"):
        return report.cli.run(report.main, [
            "--results-dir", str(results_dir), "--plots-dir", str(plots_dir),
            "--readme", str(readme), "--results-readme", str(out / "RESULTS.md")])

    def snapshot():
        return {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    return run, snapshot


@pytest.mark.parametrize("suite, change, message", BAD_RESULTS)
def test_a_bad_results_file_is_named_with_its_field_and_nothing_is_written(
        tmp_path, report_into, capsys, suite, change, message):
    run, snapshot = report_into
    results = tmp_path / "results"
    shutil.copytree(REPO / "results" / "cpu", results)
    path = results / f"{suite}.json"
    if isinstance(change, bytes):
        path.write_bytes(change)
    else:
        document = json.loads(path.read_text(encoding="utf-8"))
        # read as current rows (the report checks the fields of those only), whatever
        # schema the committed file has: the change is the one thing wrong with it
        document["schema_version"] = SCHEMA_VERSIONS[suite]
        change(document)
        path.write_text(json.dumps(document))  # json writes NaN
    before = snapshot()
    assert run(results) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(f"error: {re.escape(str(path))}: {message}.*\n", err), err
    assert snapshot() == before


def a_file(path: Path) -> Path:
    shutil.rmtree(path)
    path.write_text("not a directory")
    return path


def read_only(path: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories: run as another user")
    path.chmod(0o555)
    return path


BAD_OUTPUTS = [  # (argument, its bad path made in the output dir, what the error says)
    ("plots_dir", lambda out: a_file(out / "plots"), r"plots is not a directory"),
    ("plots_dir", lambda out: a_file(out / "plots") / "figures", r"plots is not a directory"),
    ("plots_dir", lambda out: read_only(out / "plots"), r"plots is not writable"),
    ("readme", lambda out: read_only(out) / "README.md", r"out is not writable"),
]


@pytest.mark.parametrize("argument, make, message", BAD_OUTPUTS,
                         ids=["plots-a-file", "plots-under-a-file", "plots-read-only",
                              "readme-read-only"])
def test_an_unwritable_output_is_named_and_nothing_is_written(
        tmp_path, report_into, capsys, argument, make, message):
    run, snapshot = report_into
    bad = make(tmp_path / "out")
    before = snapshot()
    try:
        code = run(REPO / "results" / "cpu", **{argument: bad})
    finally:
        for path in (tmp_path / "out", tmp_path / "out" / "plots"):
            if path.is_dir():
                path.chmod(0o755)  # so that pytest can remove it
    assert code == 2
    err = capsys.readouterr().err
    option = "--" + argument.replace("_", "-")
    assert re.fullmatch(f"error: {re.escape(f'{option} {bad}')}: .*{message}.*\n", err), err
    assert snapshot() == before


def test_diverged_sweep_runs_are_reported_as_diverged(tmp_path, report_into):
    """A sweep point that diverged (null losses) is counted and drawn as such, not refused."""
    run, snapshot = report_into
    results = tmp_path / "results"
    shutil.copytree(REPO / "results" / "cpu", results)
    path = results / "lr_sweep.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    grid_row = next(r for r in document["rows"] if r["optimizer"] == "adamw" and not r.get("variant"))
    variant_row = next(r for r in document["rows"] if r.get("variant"))
    nulls = {"final_train_loss": None, "final_val_loss": None, "final_val_loss_whole_split": None,
             "evals": [], "diverged": True, "diverged_at": 7}
    document["rows"].append({**grid_row, "learning_rate": 1.0, **nulls})
    document["rows"].append({**variant_row, "variant": "lr-too-high", **nulls})
    path.write_text(json.dumps(document))
    assert run(results) == 0
    results_page = snapshot()[tmp_path / "out" / "RESULTS.md"].decode()
    runs = sum(1 for r in document["rows"] if r["optimizer"] == "adamw" and not r.get("variant"))
    assert f"| {runs} (1 diverged) |" in results_page
    assert "| `lr-too-high` |" in results_page and "diverged at iteration 7" in results_page
