"""Figures and README tables from the committed results: ``python -m bench.report``.

Reads ``results/<device>/<suite>.json`` (published files only, not ``<suite>.<profile>.json``),
writes the figures to ``plots/`` and the tables into README.md between marker comments
``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``. The same results give
byte-identical PNGs and README: fixed fonts, sizes and DPI, and no date or software
metadata in the PNGs. A results file that breaks the schema stops the run with its path
and reason before anything is written; README is replaced atomically.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from pathlib import Path
from typing import Sequence

from memeff import cli
from memeff.results import atomic_write, read_results

REPO = Path(__file__).resolve().parents[1]
SUITES = ("kv_cache", "optimizer_state", "step_time", "training")
OPTIMIZER_LABELS = {
    "adamw": "AdamW (torch, fused)", "adamw_fused": "AdamW fused (torch)",
    "adamw_foreach": "AdamW foreach (torch)", "adamsn": "AdamSN", "adamsnsm": "AdamSN+SM",
    "adafactor": "Adafactor (ours)", "torch_adafactor": "Adafactor (torch)",
    "torch_adafactor_foreach": "Adafactor (torch, foreach)",
}


def load_results(results_dir: Path) -> dict[str, dict]:
    """Published results per suite, validated; missing suites are left out."""
    found = {}
    for suite in SUITES:
        path = results_dir / f"{suite}.json"
        if path.is_file():
            found[suite] = read_results(path)
    return found


def float32_rows(state: dict) -> list[dict]:
    """Optimizer-state rows of float32 parameters (rows from before the dtype axis are)."""
    return [r for r in state["rows"] if r.get("dtype", "torch.float32") == "torch.float32"]


# ---- tables -------------------------------------------------------------------------

def kv_table(kv: dict) -> str:
    rows = [r for r in kv["rows"] if r["test"].startswith("test_model_shape")]
    lines = ["| model | layers | query heads | K/V heads | head dim | bytes/token (bf16) "
             "| vs MHA | GiB per 32k tokens |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['n_layer']} | {r['n_head']} | {r['n_kv_head']} | "
                     f"{r['head_dim']} | {r['bytes_per_token']:,} | {r['fraction_of_mha']:.1%} | "
                     f"{r['gib_per_32k_context']:.2f} |")
    return "\n".join(lines)


def state_table(state: dict) -> str:
    shapes = [(768, 3072), (50257, 768)]
    names = ("adamw", "adamsn", "adamsnsm", "adafactor", "torch_adafactor")
    by_key = {(tuple(r["shape"]), r["optimizer"]): r for r in float32_rows(state)
              if "subset_size" not in r}
    header = "| optimizer | " + " | ".join(f"state of a {n}x{m} weight, % of AdamW" for n, m in shapes) + " |"
    lines = [header, "| --- |" + " ---: |" * len(shapes)]
    for name in names:
        cells = []
        for shape in shapes:
            r = by_key.get((shape, name))
            cells.append("n/a" if r is None else f"{r['live_bytes']:,} B ({r['ratio_to_adamw']:.2%})")
        lines.append(f"| {OPTIMIZER_LABELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def step_table(step: dict) -> str:
    summary = step["summary"]
    models = sorted(summary)
    lines = ["| optimizer | " + " | ".join(f"{m}: step vs AdamW fused / foreach" for m in models) + " |",
             "| --- |" + " ---: |" * len(models)]
    for name in OPTIMIZER_LABELS:
        if name == "adamw":
            continue
        cells = []
        for model in models:
            r = summary[model].get(name)
            cells.append("n/a" if r is None else
                         f"{r['ratio_to_adamw_fused']:.2f}x / {r['ratio_to_adamw_foreach']:.2f}x")
        lines.append(f"| {OPTIMIZER_LABELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def provenance(results: dict[str, dict]) -> str:
    lines = []
    for suite, doc in results.items():
        env = doc["environment"]
        dirty = " (uncommitted changes)" if env.get("git_dirty") else ""
        lines.append(f"- `{suite}`: profile `{doc['profile']}`, {env['utc_time']}, commit "
                     f"`{(env.get('git_commit') or 'unknown')[:7]}`{dirty}, torch {env['torch']}, "
                     f"{env.get('gpu') or env['cpu']} ({env['torch_threads']} threads)")
    missing = [s for s in SUITES if s not in results]
    if missing:
        lines.append(f"- not yet published: {', '.join(f'`{s}`' for s in missing)}")
    return "\n".join(lines)


def tables(results: dict[str, dict]) -> dict[str, str]:
    """Marker name -> Markdown, for every table whose suite is published."""
    out = {"provenance": provenance(results)}
    if "kv_cache" in results:
        out["kv-table"] = kv_table(results["kv_cache"])
    if "optimizer_state" in results:
        out["state-table"] = state_table(results["optimizer_state"])
    if "step_time" in results:
        out["step-table"] = step_table(results["step_time"])
    return out


def render_readme(text: str, blocks: dict[str, str]) -> str:
    """``text`` with each marked block replaced; a missing block says it is pending."""
    def replace(match: re.Match) -> str:
        name = match.group(1)
        body = blocks.get(name, "_No results published for this table yet._")
        return f"<!-- results:{name} -->\n{body}\n<!-- /results:{name} -->"

    return re.sub(r"<!-- results:([\w-]+) -->.*?<!-- /results:\1 -->", replace, text,
                  flags=re.DOTALL)


# ---- figures ------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcdefaults()
    plt.rcParams.update({"font.family": "DejaVu Sans", "font.size": 9, "figure.dpi": 100,
                         "savefig.dpi": 100, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None}, bbox_inches=None)
    return buffer.getvalue()


def kv_bytes_figure(plt, kv: dict):
    rows = [r for r in kv["rows"] if r["test"].startswith("test_decode") and r["dtype"] == "torch.float32"]
    seq_lens = sorted({r["seq_len"] for r in rows})
    fig, axes = plt.subplots(1, len(seq_lens), figsize=(10, 3.4), sharey=True)
    for ax, seq_len in zip(axes, seq_lens):
        for n_head in sorted({r["n_head"] for r in rows}):
            pts = sorted((r["n_head"] // r["n_kv_head"], r["analytic_bytes"], r["live_bytes"])
                         for r in rows if r["seq_len"] == seq_len and r["n_head"] == n_head)
            line, = ax.plot([p[0] for p in pts], [p[1] / 2**20 for p in pts], label=f"n_head {n_head} (formula)")
            ax.scatter([p[0] for p in pts], [p[2] / 2**20 for p in pts], color=line.get_color(),
                       marker="o", s=18, label=f"n_head {n_head} (live tensors)")
        ax.set(xscale="log", yscale="log", title=f"context {seq_len} tokens",
               xlabel="query heads per K/V head (1 = MHA)")
        ax.set_xticks([1, 2, 4, 8, 16, 32], labels=["1", "2", "4", "8", "16", "32"])
    axes[0].set_ylabel("KV-cache size (MiB, float32, 2 layers, batch 1)")
    axes[-1].legend(fontsize=7)
    fig.suptitle("KV-cache bytes against grouping: formula (lines) and live tensors (points)")
    fig.tight_layout()
    return fig


def decode_time_figure(plt, kv: dict):
    rows = [r for r in kv["rows"] if r["test"].startswith("test_decode") and r["n_head"] == 32]
    dtypes = sorted({r["dtype"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(dtypes), figsize=(8, 3.4), sharey=True)
    for ax, dtype in zip(axes, dtypes):
        for seq_len in sorted({r["seq_len"] for r in rows}):
            pts = sorted((r["n_kv_head"], r["median_s"]) for r in rows
                         if r["dtype"] == dtype and r["seq_len"] == seq_len)
            ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=f"context {seq_len}")
        ax.set(xscale="log", yscale="log", xlabel="n_kv_head (of 32 query heads)",
               title=dtype.removeprefix("torch."))
        ax.set_xticks([1, 4, 8, 16, 32], labels=["1", "4", "8", "16", "32"])
    axes[0].set_ylabel("decode attention, one layer (ms, median)")
    axes[-1].legend(fontsize=7)
    fig.suptitle("One decode step's attention over the cache, 32 query heads, head dim 128")
    fig.tight_layout()
    return fig


def state_ratio_figure(plt, state: dict):
    rows = [r for r in float32_rows(state) if "subset_size" not in r and r["optimizer"] != "adamw"]
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in rows))
    names = list(dict.fromkeys(r["optimizer"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, 3.6))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ratios = {tuple(r["shape"]): r["ratio_to_adamw"] for r in rows if r["optimizer"] == name}
        ax.bar([x + i * width for x in range(len(shapes))], [ratios.get(s, 0) for s in shapes],
               width, label=OPTIMIZER_LABELS[name])
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))],
                  labels=["x".join(map(str, s)) for s in shapes])
    ax.set(yscale="log", ylabel="optimizer state / AdamW's (measured bytes)",
           xlabel="parameter shape", title="Optimizer-state bytes as a fraction of AdamW's")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def step_time_figure(plt, step: dict):
    summary = step["summary"]
    models = sorted(summary)
    names = [n for n in OPTIMIZER_LABELS if n != "adamw" and all(n in summary[m] for m in models)]
    fig, axes = plt.subplots(1, len(models), figsize=(10, 3.6), sharey=True)
    for ax, model in zip(axes, models):
        fused = [summary[model][n]["ratio_to_adamw_fused"] for n in names]
        ax.barh(range(len(names)), fused)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set(xscale="log", title=model, xlabel="step time / AdamW fused's (interleaved medians)")
        ax.set_yticks(range(len(names)), labels=[OPTIMIZER_LABELS[n] for n in names])
    fig.suptitle("Optimizer step time relative to torch's fused AdamW, same run")
    fig.tight_layout()
    return fig


FIGURES = {  # file name -> (suite it needs, builder)
    "kv_cache_bytes.png": ("kv_cache", kv_bytes_figure),
    "decode_time.png": ("kv_cache", decode_time_figure),
    "optimizer_state_ratio.png": ("optimizer_state", state_ratio_figure),
    "step_time_ratio.png": ("step_time", step_time_figure),
}


def figures(results: dict[str, dict]) -> dict[str, bytes]:
    """PNG bytes per file name, for every figure whose suite is published."""
    plt = _pyplot()
    out = {}
    for name, (suite, build) in FIGURES.items():
        if suite in results:
            fig = build(plt, results[suite])
            out[name] = _png(fig)
            plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=REPO / "results" / "cpu",
                        help="(default: results/cpu)")
    parser.add_argument("--plots-dir", type=Path, default=REPO / "plots", help="(default: plots)")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md", help="(default: README.md)")
    args = parser.parse_args(argv)
    results = load_results(args.results_dir)  # raises before anything is written
    readme = render_readme(args.readme.read_text(encoding="utf-8"), tables(results))
    for name, png in figures(results).items():
        atomic_write(args.plots_dir / name, lambda f, data=png: f.write(data))
        print(f"wrote {args.plots_dir / name}")
    atomic_write(args.readme, lambda f: f.write(readme.encode("utf-8")))
    print(f"wrote {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
