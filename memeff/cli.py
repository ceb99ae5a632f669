"""What the command-line entry points share: one-line errors and exit code 2 on bad input."""

from __future__ import annotations

import argparse
import logging
import operator
import sys
from typing import Callable, NoReturn, Sequence

import torch


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def check_device(text: str) -> torch.device:
    """The device ``text`` names, checked to exist here: a ValueError says what to do instead."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {text!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {text!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {text!r}, but torch sees no GPU (torch {torch.__version__}, "
                             f"built for CUDA {torch.version.cuda}); install a CUDA build of "
                             f"torch or use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {text!r}, but torch sees {torch.cuda.device_count()} GPU(s); "
                             f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


SEED_RANGE = (-2**63, 2**64 - 1)  # torch.manual_seed and Generator.manual_seed (negatives mod 2**64)


def check_seed(seed, name: str) -> None:
    """A ValueError naming ``name`` unless ``seed`` is an integer torch takes as a seed."""
    try:
        value = None if isinstance(seed, bool) else operator.index(seed)  # numpy ints too
    except TypeError:
        value = None
    if value is None or not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise ValueError(f"{name} must be an integer from -2**63 to 2**64 - 1, the seeds "
                         f"torch takes; got {seed!r}")


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``, turning bad input into one stderr line and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return main(argv)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
