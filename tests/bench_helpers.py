"""Helpers the benchmark suites' tests share: running a suite as on a machine without the
peers' packages (as in CI, which installs none of them; torch's Muon, whose package is
torch, still runs), and the numbers in a results document."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# a pytest plugin that makes every peer package's import fail, as when it is not installed
BLOCK_PEERS_PLUGIN = '''
import sys

from memeff.optim.registry import SPECS

for optimizer in SPECS:
    if optimizer.package not in (None, "torch"):
        sys.modules[optimizer.package.replace("-", "_")] = None  # import now fails
'''


def blocked_peers_env(plugin_dir: Path, extra: str = "") -> dict[str, str]:
    """The environment of a ``python -m pytest ... -p block_peers`` run: the plugin (with
    ``extra`` code after it) written to ``plugin_dir`` and put on the path."""
    (plugin_dir / "block_peers.py").write_text(BLOCK_PEERS_PLUGIN + extra)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(plugin_dir), str(REPO), os.environ.get("PYTHONPATH", "")])}


def numbers(value):
    """Every int and float in a results document (booleans left out), depth first."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from numbers(item)
