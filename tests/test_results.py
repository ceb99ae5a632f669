"""Results files: the schema every committed file must meet, and their provenance."""

import json
from pathlib import Path

import pytest
import torch

from bench.results import environment, read_results, results_document, validate_results

RESULTS = Path(__file__).resolve().parents[1] / "results"
COMMITTED = sorted(RESULTS.glob("*/*.json"))


@pytest.mark.skipif(not COMMITTED, reason="no results committed yet")
@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(RESULTS)))
def test_committed_results_meet_the_schema(path):
    document = read_results(path)
    assert document["suite"] == path.name.split(".")[0]
    assert document["environment"]["device_type"] == path.parent.name


def test_document_records_environment_and_validates():
    document = results_document("kv_cache", "quick", environment("cpu"), [1337], {"a": 1},
                                [{"x": 1}])
    env = document["environment"]
    for key in ("utc_time", "finished_utc_time", "git_commit", "git_dirty", "python", "torch", "numpy", "cpu",
                "torch_threads", "cpu_capability"):
        assert key in env
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    validate_results(json.loads(json.dumps(document)))


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("rows"), "missing field 'rows'"),
    (lambda d: d.update(schema_version=99), "schema_version"),
    (lambda d: d.update(profile="huge"), "profile"),
    (lambda d: d.update(rows={"x": 1}), "rows"),
    (lambda d: d["environment"].pop("torch"), "torch"),
    (lambda d: d.update(rows=[1]), "row 0"),
])
def test_bad_documents_are_rejected_with_the_reason(change, message):
    document = results_document("kv_cache", "quick", environment("cpu"), [1337], {}, [{"x": 1}])
    change(document)
    with pytest.raises(ValueError, match=message):
        validate_results(document)


def test_read_results_rejects_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"schema_version": 1,')
    with pytest.raises(ValueError, match="not valid JSON"):
        read_results(path)


def test_outside_git_the_commit_comes_from_the_environment(tmp_path, monkeypatch):
    from bench.results import git_state

    monkeypatch.delenv("MEMEFF_SOURCE_COMMIT", raising=False)
    assert git_state(tmp_path) == {"commit": None, "dirty": None}
    monkeypatch.setenv("MEMEFF_SOURCE_COMMIT", "0123abc")
    assert git_state(tmp_path) == {"commit": "0123abc", "dirty": None}


def test_changed_results_and_plots_do_not_make_the_tree_dirty(tmp_path):
    import subprocess

    from bench.results import git_state

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    for name in ("code.py", "results/cpu/suite.json", "plots/figure.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("0\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    (tmp_path / "results/cpu/suite.json").write_text("1\n")
    (tmp_path / "plots/figure.png").write_text("1\n")
    assert git_state(tmp_path / "results")["dirty"] is False  # from any directory of the tree
    (tmp_path / "code.py").write_text("1\n")
    assert git_state(tmp_path / "results")["dirty"] is True


def test_a_file_of_older_rows_reads_but_is_not_current():
    from bench.results import SCHEMA_VERSIONS, is_current

    document = results_document("kv_cache", "full", environment("cpu"), [1337], {}, [{"x": 1}])
    assert is_current(document)
    document["schema_version"] = SCHEMA_VERSIONS["kv_cache"] - 1
    validate_results(document)
    assert not is_current(document)
    document["schema_version"] = SCHEMA_VERSIONS["kv_cache"] + 1
    with pytest.raises(ValueError, match="reads kv_cache files up to"):
        validate_results(document)
