"""Generate text from a training checkpoint with the KV cache: ``python -m memeff.sample``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import torch

from memeff import cli
from memeff.data import bpe_codec, char_codec
from memeff.model import GPT, GPTConfig
from memeff.train import CHECKPOINT_NAME


def load_checkpoint(path: str | Path, device: str = "cpu"):
    """The model and its text codec (encode, decode) from a checkpoint file or directory."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train with --out-dir first")
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    model = GPT(GPTConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    if checkpoint["dataset"] == "char":
        encode, decode = char_codec(checkpoint["chars"])
    else:
        encode, decode, _ = bpe_codec()
    return model, encode, decode


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m memeff.sample",
                                description="Sample text from a memeff checkpoint.")
    parser.add_argument("checkpoint", help="checkpoint file, or the --out-dir of a training run")
    parser.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    parser.add_argument("--max-new-tokens", type=int, default=500, help="(default: 500)")
    parser.add_argument("--temperature", type=float, default=0.8, help="(default: 0.8)")
    parser.add_argument("--top-k", type=int, default=200, help="(default: 200)")
    parser.add_argument("--num-samples", type=int, default=1, help="(default: 1)")
    parser.add_argument("--seed", type=int, default=1337, help="(default: 1337)")
    parser.add_argument("--device", default="cpu", help="(default: cpu)")
    args = parser.parse_args(argv)
    if args.num_samples <= 0:
        raise ValueError(f"--num-samples must be positive, got {args.num_samples}")

    model, encode, decode = load_checkpoint(args.checkpoint, args.device)
    prompt = encode(args.prompt)
    if not prompt:
        raise ValueError("--prompt must not be empty")
    idx = torch.tensor([prompt], dtype=torch.long, device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    for i in range(args.num_samples):
        out = model.generate(idx, args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, generator=generator)
        if i:
            print("---------------")
        print(decode(out[0].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
