"""Memory-reduced optimizers, the registry of every optimizer the project compares, and the
factory that builds any of them over a model."""

from memeff.optim.adafactor import Adafactor
from memeff.optim.adamsn import AdamSN
from memeff.optim.build import build_optimizer, build_optimizer_for_tensors
from memeff.optim.registry import OPTIMIZER_NAMES, REGISTRY

__all__ = ["AdamSN", "Adafactor", "OPTIMIZER_NAMES", "REGISTRY", "build_optimizer",
           "build_optimizer_for_tensors"]
