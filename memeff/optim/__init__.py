"""Memory-reduced optimizers and the factory that builds any optimizer the project compares."""

from memeff.optim.build import OPTIMIZER_NAMES, build_optimizer

__all__ = ["OPTIMIZER_NAMES", "build_optimizer"]
