"""The bench suite's results files: written when a run completes, never half-written,
and a quick run never replaces a published full-profile file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.results import read_results

REPO = Path(__file__).resolve().parents[1]
INTERRUPT_PLUGIN = '''
import pytest

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    if "falcon" in item.name:
        raise KeyboardInterrupt
'''


def run_bench(results_dir: Path, *extra: str, env=None):
    command = [sys.executable, "-m", "pytest", "bench/test_kv_cache.py", "-k", "model_shape",
               "--benchmark-only", "--benchmark-disable-gc", "--profile", "quick",
               "--results-dir", str(results_dir), "-q", "-p", "no:cacheprovider", *extra]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=env)


def test_bench_writes_results_then_protects_published_ones(tmp_path):
    result = run_bench(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    written = read_results(tmp_path / "kv_cache.json")
    assert written["profile"] == "quick"
    assert {r["model"] for r in written["rows"]} >= {"llama-2-70b (GQA 64/8)"}
    llama = next(r for r in written["rows"] if r["model"].startswith("llama"))
    assert llama["bytes_per_token"] == 327_680

    # pretend the file is a published full run: a quick run must write beside it
    published = dict(written, profile="full")
    (tmp_path / "kv_cache.json").write_text(json.dumps(published))
    before = (tmp_path / "kv_cache.json").read_bytes()
    result = run_bench(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "kv_cache.json").read_bytes() == before
    assert read_results(tmp_path / "kv_cache.quick.json")["profile"] == "quick"


def test_full_run_of_part_of_a_suite_never_writes_the_published_name(tmp_path):
    published = tmp_path / "kv_cache.json"
    published.write_text('{"previous": true}')
    result = run_bench(tmp_path, "--profile", "full")  # -k model_shape: part of the suite
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(published.read_text()) == {"previous": True}
    partial = read_results(tmp_path / "kv_cache.partial.json")
    assert partial["profile"] == "full" and len(partial["rows"]) == 4
    assert "not every test of the suite ran" in result.stdout


def test_interrupted_bench_leaves_previous_results(tmp_path):
    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir()
    (plugin_dir / "interrupt_plugin.py").write_text(INTERRUPT_PLUGIN)
    results = tmp_path / "results"
    results.mkdir()
    (results / "kv_cache.json").write_text('{"previous": true}')
    env = {**os.environ, "PYTHONPATH": str(plugin_dir)}
    result = run_bench(results, "-p", "interrupt_plugin", env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no results written" in result.stdout
    assert sorted(p.name for p in results.iterdir()) == ["kv_cache.json"]
    assert json.loads((results / "kv_cache.json").read_text()) == {"previous": True}


def test_interrupted_worker_pool_stops_its_runs_at_once():
    import time

    from bench.common import worker_pool

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with worker_pool(2) as pool:
            runs = [pool.apply_async(time.sleep, (120,)) for _ in range(3)]
            processes = list(pool._pool)
            time.sleep(1)  # the runs are going
            raise KeyboardInterrupt
    assert time.monotonic() - start < 60
    assert not any(p.is_alive() for p in processes)
    assert not any(run.ready() and run.successful() for run in runs)


FAKE_SUITE = '''
import dataclasses

import pytest

@dataclasses.dataclass
class Row:
    value: int

def suite_config(profile):
    return {{}}

def test_recorded(record, benchmark):
    benchmark(lambda: None)
    {allocate}
    record(Row(value=1))

@pytest.mark.parametrize("i", range(3))
def test_skipped_by_profile(benchmark, i):
    pytest.skip("in the full profile: run with --profile full")

def test_skipped_for_a_gpu(benchmark):
    pytest.skip("needs a GPU")
'''


def test_bench_end_names_files_counts_skips_and_records_peak_memory(tmp_path):
    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "test_a_small.py").write_text(FAKE_SUITE.format(allocate="pass"))
    # the later suite writes 800 MB that stay resident while its test runs
    (suites / "test_b_large.py").write_text(FAKE_SUITE.format(
        allocate="held = b'x' * 800_000_000"))
    command = [sys.executable, "-m", "pytest", "-p", "bench.conftest", str(suites),
               "--benchmark-only", "--profile", "quick", "--results-dir", str(tmp_path / "out"),
               "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for suite in ("a_small", "b_large"):
        assert any(line.startswith(f"memeff: wrote {tmp_path / 'out' / suite}.json, peak RSS ")
                   for line in lines), result.stdout
    assert "memeff: 6 skipped: in the full profile: run with --profile full" in lines
    assert "memeff: 2 skipped: needs a GPU" in lines

    small = read_results(tmp_path / "out" / "a_small.json")
    large = read_results(tmp_path / "out" / "b_large.json")
    assert isinstance(small["peak_rss_bytes"], int) and small["peak_rss_bytes"] > 10 * 2**20
    assert isinstance(small["peak_rss_children_bytes"], int)
    # each suite has the peak when its own last test finished, not the session's (with a
    # margin: the later suite's 800 MB may reuse memory the earlier one had freed)
    assert large["peak_rss_bytes"] - small["peak_rss_bytes"] > 400_000_000


def test_observe_kernels_says_which_code_stepped_the_parameters():
    import torch

    from bench.common import observe_kernels
    from memeff.optim import build_optimizer_for_tensors, kernels

    cpu = torch.device("cpu")

    def observed(name, dtype=torch.float32, **settings):
        params = [torch.randn(8, 16, dtype=dtype, requires_grad=True),
                  torch.randn(16, dtype=dtype, requires_grad=True)]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = build_optimizer_for_tensors(name, params, lr=1e-3, **settings)
        before = [p.detach().clone() for p in params]
        path = observe_kernels(optimizer, optimizer.step, cpu)
        assert all(not torch.equal(p, b) for p, b in zip(params, before))  # it stepped
        assert "compiled_kernels" not in vars(optimizer)  # the wrapper is gone
        return path

    assert observed("adamw") == {"kernels": "torch", "compiled_fraction": None,
                                 "kernels_error": None}
    assert observed("adafactor", backend="eager")["kernels"] == "eager"
    assert observed("adamsn", dtype=torch.bfloat16)["kernels"] == "eager"  # not a kernel dtype
    if kernels.load() is None:
        assert observed("adamsn")["kernels_error"] == kernels.build_error()
        pytest.skip(f"the compiled kernels do not build here: {kernels.build_error()}")
    assert observed("adamsn") == {"kernels": "compiled", "compiled_fraction": 1.0,
                                  "kernels_error": None}
    assert observed("adafactor")["kernels"] == "compiled"
    # subspace momentum steps its (8, 16) matrix eagerly, the 1-D tensor in the kernels
    mixed = observed("adamsnsm", rank=2)
    assert mixed["kernels"] == "compiled+eager" and mixed["compiled_fraction"] == 16 / (128 + 16)


def test_step_time_summary_has_the_keys_the_report_reads():
    from bench.test_step_time import summarize

    row = dict(model="baby", ratio_to_adamw=0.5, ratio_to_adamw_foreach=0.25,
               fraction_of_floor=0.4, interleaved_median_s=1e-3, kernels="compiled",
               floor_bytes=1, peer=False, amortized_ratio_to_adamw=0.6,
               refresh_ratio_to_adamw=20.0, compile_s=None, shape_note=None)
    rows = [dict(row, test="test_step_time[baby-adamsnsm]", optimizer="adamsnsm"),
            dict(test="test_train_iteration[adamsn-kv4]", model="baby", optimizer="adamsn")]
    assert summarize(rows) == {"baby": {"adamsnsm": {
        "ratio_to_adamw": 0.5, "ratio_to_adamw_foreach": 0.25, "fraction_of_floor": 0.4,
        "interleaved_median_s": 1e-3, "kernels": "compiled", "peer": False,
        "amortized_ratio_to_adamw": 0.6, "refresh_ratio_to_adamw": 20.0, "compile_s": None,
        "shape_note": None}}}


def a_file(tmp_path: Path) -> Path:
    (tmp_path / "a_file").write_text("not a directory")
    return tmp_path / "a_file"


def under_a_file(tmp_path: Path) -> Path:
    return a_file(tmp_path) / "results"


def read_only(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories: run as another user")
    (tmp_path / "read_only").mkdir(mode=0o555)
    return tmp_path / "read_only" / "results"


@pytest.mark.parametrize("option", ["--results-dir", "--runs-dir"])
@pytest.mark.parametrize("make", [a_file, under_a_file, read_only])
def test_an_unwritable_output_dir_stops_the_bench_before_any_test(tmp_path, option, make):
    bad = make(tmp_path)
    dirs = {"--results-dir": tmp_path / "results", "--runs-dir": tmp_path / "runs", option: bad}
    command = [sys.executable, "-m", "pytest", "bench/test_optimizer_state.py", "--benchmark-only",
               "-k", "128x128 and adamw-float32", "-q", "-p", "no:cacheprovider",
               *(str(part) for item in dirs.items() for part in item)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"{option} {bad}" in output and "Traceback" not in output
    assert "passed" not in output  # no test ran
    assert sorted(p.name for p in tmp_path.iterdir()) == [bad.relative_to(tmp_path).parts[0]]
