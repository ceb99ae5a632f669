"""Options, fixtures and results files shared by the benchmark suites.

Each suite is one module, named after its file (bench/test_kv_cache.py is ``kv_cache``).
Its tests record rows, instances of the row dataclasses the module defines, through the
``record`` fixture; at the end of the session every suite whose tests all passed is
written, atomically, to ``<results-dir>/<suite>.json``. A change to a suite's row
dataclasses raises its version in ``bench.results.SCHEMA_VERSIONS``. An interrupted session (Ctrl-C)
writes nothing, so the previous files stay as they were. A ``--results-dir`` or
``--runs-dir`` that cannot be written or created stops the session before any test runs.

A run of the ``quick`` or ``default`` profile never replaces a published ``full`` file:
it writes ``<suite>.<profile>.json`` beside it instead, unless ``--overwrite-published``.
A ``full`` run of part of a suite (``-k``, ``--deselect``, node ids) writes
``<suite>.partial.json``, so that ``<suite>.json`` in the ``full`` profile always holds a
whole suite.

Each file records the session's peak resident memory when the suite's last test finished
(``peak_rss_bytes``, and ``peak_rss_children_bytes`` for worker processes). The end of a
run names each file written and counts the skipped tests by reason.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from bench.common import peak_rss_bytes, use_shared_copies
from bench.results import (PROFILES, check_writable_dir, environment, read_results,
                           results_document)
from memeff.io import write_json

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_SEED = 1337
DEFAULT_SEEDS = {"quick": 1, "default": 1, "full": 3}


def pytest_addoption(parser):
    group = parser.getgroup("memeff", "memeff benchmarks")
    group.addoption("--device", choices=("cpu", "cuda", "auto"), default="auto",
                    help="where to run (default: auto, CUDA when a GPU is visible)")
    group.addoption("--profile", choices=PROFILES, default="default",
                    help="quick: CI slice (<3 min on 2 CPU cores); default: <15 min; "
                         "full: what the README publishes (default: default)")
    group.addoption("--results-dir", default=None,
                    help="where results JSON goes (default: results/<device>)")
    group.addoption("--seeds", type=int, default=None,
                    help="training seeds (default: 1, or 3 for --profile full)")
    group.addoption("--train-workers", type=int, default=1,
                    help="training runs at once, each in its own process with a share of the "
                         "threads (default: 1; on a 2-core CPU 2 finish a suite ~1.4x sooner, "
                         "and each run's ms/iter is then that of a shared CPU)")
    group.addoption("--runs-dir", default=None,
                    help="keep each training run's checkpoint and result here, and pick up "
                         "what an earlier, interrupted session left there (default: a "
                         "scratch dir, so every session trains from scratch)")
    group.addoption("--overwrite-published", action="store_true",
                    help="let a quick or default run, or a full run of part of a suite, "
                         "replace published full-profile files")


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda, but torch sees no GPU "
                                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                                "install a CUDA build of torch or use --device cpu")
    return torch.device(choice)


def suite_of(path: str | os.PathLike) -> str:
    """A suite is named after its module: bench/test_kv_cache.py is "kv_cache"."""
    return Path(path).stem.removeprefix("test_")


class Recorder:
    """Collects rows per suite, notes failing suites, peak memory and skip reasons, and
    writes the files at the end."""

    def __init__(self, config):
        self.config = config
        self.environment = environment(config.memeff_device)  # the code and machine at the start
        self.rows: dict[str, list[dict]] = {}
        self.modules: dict[str, object] = {}
        self.failed: set[str] = set()
        self.partial: set[str] = set()  # suites of which some tests were not selected
        self.peak_rss: dict[str, dict[str, int | None]] = {}
        self.skipped: Counter[str] = Counter()  # reason -> tests
        self.messages: list[str] = []  # for the terminal summary

    @pytest.hookimpl(hookwrapper=True)
    def pytest_collection_modifyitems(self, session, config, items):
        collected = Counter(suite_of(item.path) for item in items)
        yield  # -k, -m and --deselect drop items here
        selected = Counter(suite_of(item.path) for item in items)
        self.partial = {suite for suite in collected if selected[suite] < collected[suite]}
        # a node id on the command line (bench/test_x.py::test_y[id]) collects part of a module
        self.partial |= {suite_of(arg.split("::")[0]) for arg in config.args if "::" in arg}

    def pytest_runtest_logreport(self, report):
        suite = suite_of(report.nodeid.split("::")[0])
        if report.failed:
            self.failed.add(suite)
        self.note_skip(report)
        if report.when == "teardown":
            # ru_maxrss is the peak over the whole process's life, never reset: a suite gets
            # the peak at the time its last test (with its fixtures' teardown) finished,
            # which includes every suite that ran before it
            self.peak_rss[suite] = peak_rss_bytes()

    def pytest_collectreport(self, report):
        self.note_skip(report)  # a module skipped as a whole (pytest.importorskip, ...)

    def note_skip(self, report) -> None:
        if not report.skipped or hasattr(report, "wasxfail"):
            return
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        self.skipped[reason.removeprefix("Skipped: ")] += 1

    def pytest_sessionfinish(self, session, exitstatus):
        # the lines wait for the terminal summary, so that they start on a line of their own
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        say = self.messages.append if reporter else print
        if exitstatus == pytest.ExitCode.INTERRUPTED:
            if self.rows:
                say("memeff: interrupted, no results written (previous files left as they were)")
            return
        self.write_results(say)
        for reason, count in self.skipped.most_common():
            say(f"memeff: {count} skipped: {reason}")

    def pytest_terminal_summary(self, terminalreporter):
        for line in self.messages:
            terminalreporter.write_line(line)

    def write_results(self, say) -> None:
        profile = self.config.getoption("--profile")
        seeds = seeds_for(self.config)
        for suite, rows in sorted(self.rows.items()):
            if suite in self.failed:
                say(f"memeff: {suite} had failures, its results were not written")
                continue
            module = self.modules[suite]
            document = results_document(suite, profile, self.environment, seeds,
                                        module.suite_config(profile), rows)
            if hasattr(module, "summarize"):
                document["summary"] = module.summarize(rows)
            peak = self.peak_rss.get(suite) or peak_rss_bytes()
            document["peak_rss_bytes"] = peak["self"]
            document["peak_rss_children_bytes"] = peak["children"]
            path = results_path(self.config, suite, partial=suite in self.partial)
            write_json(path, document)
            rss = "" if peak["self"] is None else f", peak RSS {peak['self'] / 2**30:.2f} GiB"
            say(f"memeff: wrote {path}{rss}" + (" (not every test of the suite ran)"
                                                 if suite in self.partial else ""))


def seeds_for(config) -> list[int]:
    n = config.getoption("--seeds") or DEFAULT_SEEDS[config.getoption("--profile")]
    return [BASE_SEED + i for i in range(n)]


def pytest_configure(config):
    if config.getoption("--train-workers") <= 0:
        raise pytest.UsageError(f"--train-workers must be positive, got "
                                f"{config.getoption('--train-workers')}")
    if config.getoption("--seeds") is not None and config.getoption("--seeds") <= 0:
        raise pytest.UsageError(f"--seeds must be positive, got {config.getoption('--seeds')}")
    config.memeff_device = resolve_device(config.getoption("--device"))
    # checked now, not when the results are written after every test has run
    for option, directory in (("--results-dir", results_dir(config)),
                              ("--runs-dir", config.getoption("--runs-dir"))):
        if directory is None:
            continue
        try:
            check_writable_dir(directory, f"{option} {directory}")
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
    config.memeff_recorder = Recorder(config)
    config.pluginmanager.register(config.memeff_recorder, "memeff-recorder")
    use_shared_copies(REPO_ROOT.parent / "shared")


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    return pytestconfig.memeff_device


@pytest.fixture(scope="session")
def profile(pytestconfig) -> str:
    return pytestconfig.getoption("--profile")


@pytest.fixture(scope="session")
def seeds(pytestconfig) -> list[int]:
    return seeds_for(pytestconfig)


@pytest.fixture
def record(request, benchmark):
    """``record(row)``: add ``row``, an instance of one of the suite's row dataclasses, to
    this module's suite and to the benchmark's extra_info; returns the row as written.

    The benchmark's median and rounds are added once it has run (None when timing is off),
    unless the row type has ``median_s`` and ``rounds`` fields of its own.
    """
    recorder: Recorder = request.config.memeff_recorder
    suite = suite_of(request.module.__file__)
    recorder.modules[suite] = request.module

    def add(row) -> dict:
        if not dataclasses.is_dataclass(row) or isinstance(row, type):
            raise TypeError(f"record takes a row dataclass instance, got {type(row).__name__}")
        row = dataclasses.asdict(row)
        stats = getattr(benchmark, "stats", None)
        if stats is not None and "median_s" not in row:
            row["median_s"] = stats.stats.median
            row["rounds"] = stats.stats.rounds
        row = {"test": request.node.name, **row}
        benchmark.extra_info.update({k: v for k, v in row.items() if k != "test"})
        recorder.rows.setdefault(suite, []).append(row)
        return row

    return add


def results_dir(config) -> Path:
    chosen = config.getoption("--results-dir")
    return Path(chosen) if chosen else REPO_ROOT / "results" / config.memeff_device.type


def results_path(config, suite: str, partial: bool = False) -> Path:
    path = results_dir(config) / f"{suite}.json"
    profile = config.getoption("--profile")
    if profile == "full" and partial and not config.getoption("--overwrite-published"):
        return path.with_name(f"{suite}.partial.json")
    if profile != "full" and path.is_file() and not config.getoption("--overwrite-published"):
        try:
            published = read_results(path)["profile"] == "full"
        except ValueError:
            published = False
        if published:
            path = path.with_name(f"{suite}.{profile}.json")
    return path
