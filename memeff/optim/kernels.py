"""The optional compiled CPU path: fused AdamSN and Adafactor kernels in ``kernels.cpp``.

The C++ source is built at first use (never at import) with
``torch.utils.cpp_extension.load``, which needs a C++ compiler and ninja and caches the
build under torch's extension directory (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), in :func:`build_directory`: the first build takes about a
minute, later processes load the cached library in well under a second.

Processes that load at once (DDP ranks, bench workers) take turns on a lock that ends
with its holder, however it ends. torch's own lock file in the build directory does
not: one left by an interrupted build would make every later build wait on it forever,
so the holder of ours removes it.

``load(required)`` returns the module, or None when it cannot be built: with
``required=False`` (the optimizers' ``backend="auto"``) the failure is logged once as a
warning and the optimizers keep to their eager PyTorch path; with ``required=True``
(``backend="compiled"``) it raises ``RuntimeError`` with the reason.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

from memeff.io import directory_lock

__all__ = ["COMPILED_DTYPES", "SOURCE", "NAME", "build_directory", "build_error", "load"]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")
NAME = "memeff_optim_kernels"
EXTRA_CFLAGS = ("-O3",)
# torch's own CPU kernels pick AVX2 at run time where the CPU has it; a plain build of
# ours would get SSE2 only, which makes the fused loops compute-bound. The flags enter
# torch's cache key, so a machine without AVX2 builds (and caches) its own copy.
AVX2_CFLAGS = ("-mavx2", "-mfma")


# at::parallel_for is a header template: in an OpenMP build of torch it runs in parallel
# only in code compiled with -fopenmp (the libgomp it links is the one torch has loaded).
OPENMP_FLAGS = ("-fopenmp",)


def _cflags() -> list[str]:
    flags = [*EXTRA_CFLAGS, *_ldflags()]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += AVX2_CFLAGS
    return flags


def _ldflags() -> list[str]:
    return list(OPENMP_FLAGS) if torch.backends.openmp.is_available() else []
COMPILED_DTYPES = (torch.float32, torch.float64)  # others keep to the eager path


TORCH_BATON = "lock"  # the file torch.utils.cpp_extension waits on while it exists


def build_directory(name: str = NAME) -> Path:
    """Where the kernels are built and cached: ``<extension root>/py<version>_cpu/<name>``."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / name


@functools.lru_cache(maxsize=None)
def _build(source: str, name: str) -> tuple[ModuleType | None, str | None]:
    """``(module, None)``, or ``(None, why it failed)``; tried once per process and source.

    The cache is what makes the build (or the failure, and its warning) happen once.
    """
    logger.info("memeff: loading the C++ optimizer kernels from torch's extension cache, "
                "compiling them first if they are not there (once; about a minute)")
    try:
        from torch.utils import cpp_extension

        directory = build_directory(name)
        with directory_lock(directory, wait=True):
            (directory / TORCH_BATON).unlink(missing_ok=True)  # no live build holds it now
            module = cpp_extension.load(name=name, sources=[source],
                                        extra_cflags=_cflags(), extra_ldflags=_ldflags(),
                                        build_directory=str(directory), verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed compile: all mean "eager"
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
        logger.warning("memeff: could not build the C++ optimizer kernels (%s); "
                       "AdamSN and Adafactor use their eager PyTorch path", error)
        return None, error
    return module, None


def load(required: bool = False) -> ModuleType | None:
    """The compiled kernels, building them on first use; None if they cannot be built.

    Raises RuntimeError instead of returning None when ``required``.
    """
    module, error = _build(str(SOURCE), NAME)
    if module is None and required:
        raise RuntimeError(
            f"backend='compiled' needs memeff's C++ optimizer kernels, which could not be "
            f"built ({error}). Install a C++ compiler and ninja (pip install ninja), or use "
            f"backend='auto' (falls back to eager) or backend='eager'.")
    return module


def build_error() -> str | None:
    """Why the kernels could not be built (building them if not tried yet), or None."""
    return _build(str(SOURCE), NAME)[1]
