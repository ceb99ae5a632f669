"""Memory-reduced optimizers and the factory that builds any optimizer the project compares."""

from memeff.optim.adafactor import Adafactor
from memeff.optim.adamsn import AdamSN
from memeff.optim.build import OPTIMIZER_NAMES, build_optimizer

__all__ = ["AdamSN", "Adafactor", "OPTIMIZER_NAMES", "build_optimizer"]
