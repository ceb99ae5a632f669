"""Results files: their schema, the profiles, and the environment every result records."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


OUTPUT_DIRS = ("results", "plots")  # what bench runs and the report write


def git_state(repo: str | os.PathLike | None = None) -> dict[str, Any]:
    """The checked-out commit and whether tracked files differ from it.

    Files under ``results/`` and ``plots/`` do not count: they are what runs write (a
    sweep rewrites its results file after every run), not the code that ran.
    Outside git (a copied tree, e.g. on another machine) the commit is
    ``$MEMEFF_SOURCE_COMMIT`` when set, and whether the tree differs is unknown (None).
    """
    cwd = Path(repo) if repo is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                                text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                 *(f":(top,exclude){d}" for d in OUTPUT_DIRS)],
                                cwd=cwd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": os.environ.get("MEMEFF_SOURCE_COMMIT") or None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Versions, device and source state that every results file records."""
    try:
        import numpy
        numpy_version = numpy.__version__
    except ImportError:  # torch runs without it; only some of memeff's callers need it
        numpy_version = None
    device = torch.device(device)
    env: dict[str, Any] = {
        "utc_time": _utc_now(),
        **{f"git_{k}": v for k, v in git_state().items()},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy_version,
        "platform": platform.platform(),
        "device_type": device.type,
        "cpu": cpu_model(),
        # the vector instructions torch's CPU kernels use (e.g. "AVX2", "AVX512"): two hosts
        # with the same model name may differ, and float results differ with it
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


# each suite's row and summary version (1 for a suite not listed): raised whenever the shape
# of what the suite writes changes, so that a file of older rows is known as such
SCHEMA_VERSIONS = {"kv_cache": 2, "optimizer_state": 2, "step_time": 3, "training": 1,
                   "training_bpe": 1, "training_peers": 1, "lr_sweep": 1, "sharded": 2}


def schema_version(suite: str) -> int:
    return SCHEMA_VERSIONS.get(suite, 1)
PROFILES = ("quick", "default", "full")
# how an optimizer under FSDP2 compares with one process (bench/test_sharded.py's classify)
FSDP_OUTCOMES = ("exact", "runs but differs", "fails")
# key -> type(s) every results file carries at its top level
REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "suite": str,
    "profile": str,
    "environment": dict,
    "seeds": list,
    "config": dict,
    "rows": list,
}
REQUIRED_ENVIRONMENT = ("utc_time", "git_commit", "git_dirty", "python", "torch", "numpy",
                        "device_type", "cpu", "torch_threads")


def results_document(suite: str, profile: str, env: dict[str, Any], seeds: list[int],
                     config: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A results file's contents: one suite's rows with everything needed to redo them.

    ``env`` is :func:`environment` taken when the run started (so the commit and dirty
    flag describe the code that ran); the finishing time is added here.
    """
    document = {
        "schema_version": schema_version(suite),
        "suite": suite,
        "profile": profile,
        "environment": {**env, "finished_utc_time": _utc_now()},
        "seeds": list(seeds),
        "config": config,
        "rows": rows,
    }
    validate_results(document)
    return document


def validate_results(document: Any, source: str = "results") -> None:
    """Raise ``ValueError`` naming the first way ``document`` breaks the results schema."""
    if not isinstance(document, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(document).__name__}")
    for key, kind in REQUIRED_FIELDS.items():
        if key not in document:
            raise ValueError(f"{source}: missing field {key!r}")
        if not isinstance(document[key], kind):
            raise ValueError(f"{source}: field {key!r} should be {kind}, "
                             f"got {type(document[key]).__name__}")
    newest = schema_version(document["suite"])
    if not 1 <= document["schema_version"] <= newest:
        raise ValueError(f"{source}: schema_version {document['schema_version']}, this code "
                         f"reads {document['suite']} files up to {newest}")
    if document["profile"] not in PROFILES:
        raise ValueError(f"{source}: profile {document['profile']!r} is not one of {PROFILES}")
    missing = [k for k in REQUIRED_ENVIRONMENT if k not in document["environment"]]
    if missing:
        raise ValueError(f"{source}: environment lacks {', '.join(missing)}")
    for i, row in enumerate(document["rows"]):
        if not isinstance(row, dict):
            raise ValueError(f"{source}: row {i} is not an object")


def is_current(document: dict[str, Any]) -> bool:
    """Whether a valid results document has the rows its suite writes now (not older ones)."""
    return document["schema_version"] == schema_version(document["suite"])


def check_writable_dir(directory: str | os.PathLike, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` unless files can be written into ``directory``:
    a writable directory, or a path where one can be made. Creates nothing."""
    absolute = Path(directory).absolute()
    existing = next(p for p in (absolute, *absolute.parents) if os.path.lexists(p))
    if not existing.is_dir():
        problem = f"{existing} is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    else:
        return
    raise ValueError(f"{what}: {problem}; choose a directory that can be written or created")


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate a results file."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); results "
                         "files are UTF-8 JSON, rerun the suite that wrote it") from None
    validate_results(document, str(path))
    return document
