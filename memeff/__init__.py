"""memeff: grouped-query attention with a KV cache and memory-reduced optimizers, measured."""

from memeff.model import GPT, GPTConfig, KVCache

__all__ = ["GPT", "GPTConfig", "KVCache"]
__version__ = "0.1.0"
