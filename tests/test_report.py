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
