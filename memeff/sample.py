"""Generate text from a training checkpoint with the KV cache: ``python -m memeff.sample``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import torch

from memeff import checkpoint as checkpoints
from memeff import cli
from memeff.data import bpe_codec, char_codec
from memeff.model import GPT, GPTConfig, is_integer


def load_checkpoint(path: str | Path, device: str = "cpu"):
    """The model and its text codec (encode, decode) from a checkpoint file or a run
    directory (holding ``ckpt.pt``, or the ``ckpt.dcp`` of a run sharded with FSDP2)."""
    if checkpoints.sharded_dir(path).is_dir():
        checkpoint = checkpoints.load_sharded_meta(path)
        model = GPT(GPTConfig(**checkpoint["model_config"]))
        checkpoints.load_sharded_weights(path, model)  # the whole weights, in this process
    else:
        checkpoint = checkpoints.load(path, map_location=device)
        model = GPT(GPTConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    if checkpoint["dataset"] == "char":
        encode, decode = char_codec(checkpoint["chars"])
    else:
        encode, decode, _ = bpe_codec()
    return model, encode, decode


def sample_text(checkpoint: str | Path, prompt: str = "\n", max_new_tokens: int = 500,
                temperature: float = 0.8, top_k: int | None = 200, seed: int = 1337,
                num_samples: int = 1, device: str = "cpu") -> list[str]:
    """``num_samples`` continuations of ``prompt`` (prompt included) from a checkpoint.

    Generation uses the KV cache; the same checkpoint, prompt and seed give the same text.
    """
    cli.check_device(device)
    if not is_integer(num_samples) or num_samples <= 0:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    cli.check_seed(seed, "seed (--seed)")
    model, encode, decode = load_checkpoint(checkpoint, device)
    ids = encode(prompt)
    if not ids:
        raise ValueError("the prompt must not be empty")
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    return [decode(model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                  generator=generator)[0].tolist())
            for _ in range(num_samples)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m memeff.sample",
                                description="Sample text from a memeff checkpoint.")
    parser.add_argument("checkpoint", help="checkpoint file, or the --out-dir of a training run")
    parser.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    parser.add_argument("--max-new-tokens", type=int, default=500,
                        help="tokens to generate after the prompt (default: 500)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="softmax temperature; lower is more conservative (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=200,
                        help="sample among the k likeliest tokens (default: 200)")
    parser.add_argument("--num-samples", type=int, default=1,
                        help="continuations to generate (default: 1)")
    parser.add_argument("--seed", type=int, default=1337,
                        help="seed of the sampling (default: 1337)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    args = parser.parse_args(argv)
    samples = sample_text(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature,
                          args.top_k, args.seed, args.num_samples, args.device)
    print("\n---------------\n".join(samples))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
