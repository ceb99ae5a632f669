"""The peers' rows in the optimizer-state and step-time suites: each suite's quick profile,
run into a temporary results directory with the peers' packages as installed here and
again with their imports made to fail (as in CI, which installs no peer: only torch's Muon,
whose package is torch, still runs).

The run with the packages missing also shrinks the step-time budget, so that torch's Muon
takes the path of a peer too slow for its model: timed on the budget shapes instead.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import compiles
from bench.results import read_results
from bench.test_optimizer_state import PEER_SHAPE
from bench.test_step_time import MIN_ROUNDS, fitted_rounds, over_budget, refresh_setting
from memeff.optim.registry import PEER_NAMES, PEERS_INSTALL, SPECS, missing_package, spec
from bench_helpers import blocked_peers_env, numbers

REPO = Path(__file__).resolve().parents[1]
# after blocking the peers: a step-time budget every candidate is over
SMALL_BUDGET_PLUGIN = '''
import dataclasses

import bench.test_step_time as step_time

step_time.STEP_BUDGET_S = 1e-6
step_time.BUDGET_MODELS["baby"] = (
    "baby, 1 of 4 blocks", dataclasses.replace(step_time.MODELS["baby"][0], n_layer=1))
'''
BUDGET_SHAPES = "baby, 1 of 4 blocks"
# the peers whose step each quick run times: one of each kind of step the suite handles
# (quantized, per-block, projector refreshes, momentum-only); every peer's state is counted
STEP_PEERS = ("bnb_adamw8bit", "adam_mini", "apollo_mini", "torch_muon", "lion_pytorch")


def run_quick(results: Path, env: dict | None = None, *plugins: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pytest", "bench/test_optimizer_state.py",
               "bench/test_step_time.py", "--benchmark-only", "--benchmark-disable-gc",
               "--profile", "quick", "--results-dir", str(results), "-q", "-p", "no:cacheprovider",
               *(part for plugin in plugins for part in ("-p", plugin)),
               "-k", f"(test_state_bytes and {'x'.join(map(str, PEER_SHAPE))} and "
                     f"({' or '.join(PEER_NAMES)})) or (test_step_time and ({' or '.join(STEP_PEERS)}))"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    results = tmp_path_factory.mktemp("peers_installed")
    done = run_quick(results)
    missing = {name: missing_package(name) for name in PEER_NAMES}
    return dict(stdout=done.stdout, state=read_results(results / "optimizer_state.json"),
                step=read_results(results / "step_time.json"),
                missing={name: hint for name, hint in missing.items() if hint is not None})


@pytest.fixture(scope="module")
def blocked(tmp_path_factory):
    results = tmp_path_factory.mktemp("peers_missing")
    plugin_dir = tmp_path_factory.mktemp("plugin")
    env = blocked_peers_env(plugin_dir, SMALL_BUDGET_PLUGIN)
    done = run_quick(results, env, "block_peers")
    missing = {s.name for s in SPECS if s.package not in (None, "torch")}
    return dict(stdout=done.stdout, state=read_results(results / "optimizer_state.json"),
                step=read_results(results / "step_time.json"), missing=missing)


def check_state_rows(document: dict, measured: set[str]) -> None:
    rows = {r["optimizer"]: r for r in document["rows"]}
    assert set(rows) == measured
    for name, r in rows.items():
        assert r["shape"] == list(PEER_SHAPE) and r["dtype"] == "torch.float32"
        assert r["live_bytes"] == r["analytic_bytes"] > 0, name
        assert r["allocator_bytes_after_first_step"] is None  # a CPU run
        assert r["ratio_to_adamw"] == r["live_bytes"] / r["adamw_bytes"]
        assert r["eager_instead_of_compiled"] == compiles(name)
        assert all(math.isfinite(v) for v in numbers(r)), name
    assert document["config"]["peer_shapes"] == [list(PEER_SHAPE)]


def check_step_rows(document: dict, measured: set[str], budget: bool) -> None:
    rows = {r["optimizer"]: r for r in document["rows"]}
    assert set(rows) == measured
    for name, r in rows.items():
        assert all(math.isfinite(v) for v in numbers(r)), name
        assert r["model"] == "baby" and r["peer"] and r["state_bytes"] > 0
        assert r["ratio_to_adamw"] == r["interleaved_median_s"] / r["adamw_median_s"] > 0
        assert r["first_step_s"] > 0 and r["compile_s"] is None  # quick: no compiling peer
        assert r["fraction_of_floor"] > 0 and r["floor_bytes"] > 0
        if refresh_setting(name) is None:
            assert r["refresh_interval"] is r["refresh_step_median_s"] is None
            assert r["amortized_median_s"] == r["interleaved_median_s"]
        else:
            assert r["refresh_interval"] == spec(name).matrix_settings[refresh_setting(name)]
            assert r["refresh_step_median_s"] > 0 and 1 <= r["refresh_rounds"]
            assert math.isclose(r["amortized_median_s"], r["interleaved_median_s"] + (
                r["refresh_step_median_s"] - r["interleaved_median_s"]) / r["refresh_interval"])
        if budget:  # over the (shrunk) budget: timed on the budget shapes with both AdamWs
            assert r["timed_shapes"] == BUDGET_SHAPES and BUDGET_SHAPES in r["shape_note"]
            assert r["interleaved_rounds"] == MIN_ROUNDS
            assert {"adamw", "adamw_foreach", name} <= set(r["interleaved_with"])
        else:
            assert r["timed_shapes"] == "baby" and r["shape_note"] is None
            assert set(r["interleaved_with"]) == {"adamw", name, "inplace_add"}
    assert set(document["summary"]["baby"]) == measured


def check_skips(run: dict, suites: int) -> None:
    """Each missing peer's rows are skipped with its install hint, and the results say so."""
    lines = run["stdout"].splitlines()
    for name in run["missing"]:
        package = spec(name).package
        hint = [line for line in lines if f"skipped: {name} needs the {package} package" in line]
        assert len(hint) == 1 and PEERS_INSTALL in hint[0], run["stdout"]
        count = suites if name in STEP_PEERS else 1
        assert hint[0].startswith(f"memeff: {count} skipped: "), hint[0]
    for document in (run["state"], run["step"]):
        assert set(document["config"]["peer_packages_missing"]) == set(run["missing"])


def test_quick_profiles_measure_the_installed_peers(installed):
    present = {name for name in PEER_NAMES if name not in installed["missing"]}
    check_state_rows(installed["state"], present)
    check_step_rows(installed["step"], present & set(STEP_PEERS), budget=False)
    check_skips(installed, suites=2)


def test_quick_profiles_skip_missing_peers_with_the_install_hint(blocked):
    assert blocked["missing"] == set(PEER_NAMES) - {"torch_muon"}
    check_state_rows(blocked["state"], {"torch_muon"})
    check_step_rows(blocked["step"], {"torch_muon"}, budget=True)
    check_skips(blocked, suites=2)


def test_a_step_over_the_budget_gets_fewer_rounds_but_not_fewer_than_the_minimum():
    from bench.test_step_time import STEP_BUDGET_S, WARMUP_ROUNDS

    fits = STEP_BUDGET_S / (10 + WARMUP_ROUNDS)
    assert not over_budget(fits, 10) and over_budget(fits * 1.01, 10)
    assert fitted_rounds(fits, 10) == 10 and fitted_rounds(fits * 2, 10) == 4
    assert fitted_rounds(STEP_BUDGET_S, 10) == MIN_ROUNDS
