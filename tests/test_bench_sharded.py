"""The sharded (FSDP2) benchmark suite: its quick profile end to end, and its summary."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.results import read_results
from bench.test_sharded import OPTIMIZERS, is_exact, summarize

REPO = Path(__file__).resolve().parents[1]
OURS = ("adamw", "adamsn", "adamsnsm", "adafactor")  # memeff promises these exact under FSDP2


@pytest.fixture(scope="module")
def quick_document(tmp_path_factory):
    results = tmp_path_factory.mktemp("sharded")
    command = [sys.executable, "-m", "pytest", "bench/test_sharded.py", "--benchmark-only",
               "--profile", "quick", "--results-dir", str(results), "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return read_results(results / "sharded.json")


def finite_numbers(value):
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from finite_numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from finite_numbers(item)


def test_quick_profile_measures_every_optimizer_at_each_world_size(quick_document):
    rows = quick_document["rows"]
    sizes = quick_document["config"]["world_sizes"]
    assert sorted((r["world_size"], r["optimizer"]) for r in rows) == sorted(
        (n, name) for n in sizes for name in OPTIMIZERS)
    assert max(sizes) > 1
    assert all(math.isfinite(v) for v in finite_numbers(rows))
    for r in rows:
        if r["world_size"] == 1 or r["optimizer"] in OURS:
            assert r["works"], r
        if not r["works"]:  # torch's Adafactor, until torch fixes it: the row says why
            assert r["error"] and r["state_bytes_per_rank"] is None
            continue
        assert r["state_bytes_per_rank"] == r["analytic_state_bytes_per_rank"]
        for key in ("state_bytes_per_rank", "step_peak_bytes_per_rank", "collective_share_per_rank",
                    "step_median_s_per_rank", "one_process_median_s_per_rank"):
            assert len(r[key]) == r["world_size"], key
        assert all(0 <= share <= 1 for share in r["collective_share_per_rank"])
        assert r["step_time_ratio"] > 0 and is_exact(r)
        if r["world_size"] == 1:  # the same steps twice in one process
            assert r["collective_share_per_rank"] == [0.0]
            assert r["max_param_rel_diff"] == r["micro_batch_rel_diff"] == 0.0


def test_quick_profile_state_per_rank_shrinks_with_the_world(quick_document):
    state = {(r["optimizer"], r["world_size"]): r["state_bytes_per_rank"]
             for r in quick_document["rows"] if r["works"]}
    for name in OURS:
        alone = state[(name, 1)][0]
        for n in quick_document["config"]["world_sizes"][1:]:
            assert max(state[(name, n)]) < alone, name
    assert quick_document["summary"] == summarize(quick_document["rows"])


def row(name, world_size, works=True, diff=1e-7, error=None, rounding=1e-8):
    return {"optimizer": name, "world_size": world_size, "works": works, "error": error,
            "max_param_rel_diff": diff if works else None,
            "max_update_rel_diff": 2 * diff if works else None,
            "micro_batch_rel_diff": rounding if works else None}


def test_summary_counts_only_sharded_rows_and_keeps_the_first_error():
    rows = [row("adamw", 1, diff=0.0), row("adamw", 2, diff=1e-7),
            row("adamw", 4, diff=3e-5, rounding=6e-6),  # over 1e-5, within 10x the rounding
            row("adamsn", 2), row("adamsn", 4, diff=2e-2),
            row("torch_adafactor", 1), row("torch_adafactor", 2, works=False, error="first"),
            row("torch_adafactor", 4, works=False, error="second")]
    summary = summarize(rows)
    assert summary["adamw"] == {"works": True, "exact": True, "error": None,
                                "max_param_rel_diff": 3e-5, "max_update_rel_diff": 6e-5,
                                "micro_batch_rel_diff": 6e-6, "world_sizes": [2, 4]}
    assert summary["adamsn"]["works"] and not summary["adamsn"]["exact"]  # runs, silently off
    assert summary["torch_adafactor"] == {"works": False, "exact": False, "error": "first",
                                          "max_param_rel_diff": None, "max_update_rel_diff": None,
                                          "micro_batch_rel_diff": None, "world_sizes": [2, 4]}
    assert summarize([row("adamw", 1)]) == {}
