"""Figures and README tables from the published results: ``python -m bench.report``.

Reads ``results/<device>/<suite>.json`` (published files only, not ``<suite>.<profile>.json``)
and fills the blocks between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` in
README.md (the headline) and results/README.md (every table), and draws the figures in
``plots/``. Everything is rendered in memory first and then moved into place, so a bad
results file (its schema; a field the report reads missing, of the wrong type or naming an
unknown optimizer; NaN or infinity), an output directory it cannot write or a failing figure
stops the run with the file and field (or the path) named before anything is written, and
plots and READMEs never disagree. The same
results give byte-identical output: fixed fonts, sizes and DPI, no date or software
metadata in the PNGs.

A suite whose committed file predates its current rows is shown as not yet measured,
with the command that measures it, rather than read wrongly.

The peers (other packages' optimizers, ``registry.PEER_NAMES``) are shown beside ours, in
italics: their state and step-time rows from those suites, their training runs from
``training_peers.json``, whose losses are set beside (and paired by seed with) the AdamW
runs of ``training.json`` only where both trained the same problem (:func:`not_comparable`).

``--compare DIR`` prints the ``quick``/``default`` results in DIR beside the published
ones (and whether they fall inside the published spread) and writes nothing.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import re
import reprlib
import stat
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Sequence

from bench.results import FSDP_OUTCOMES, check_writable_dir, is_current, read_results
from memeff import cli
from memeff.optim.registry import BASELINE, OPTIMIZER_NAMES, PEER_NAMES, REGISTRY, label, spec

REPO = Path(__file__).resolve().parents[1]
SUITES = ("kv_cache", "optimizer_state", "step_time", "training", "training_bpe",
          "training_peers", "lr_sweep", "sharded")
TRAINING_SUITES = ("training", "training_bpe", "training_peers")
COMPARED_PROFILES = ("default", "quick")  # the user's own runs, for --compare
MARKER = re.compile(r"<!-- results:([\w-]+) -->.*?<!-- /results:\1 -->", re.DOTALL)


def run_command(suite: str) -> str:
    """The command that publishes ``suite``."""
    if suite == "lr_sweep":
        return "python -m bench.lr_sweep --workers 2 --publish"
    return f"python -m pytest bench/test_{suite}.py --benchmark-only --profile full"


# ---- loading and checking -------------------------------------------------------------

def check_finite(value: Any, source: str, where: str = "") -> None:
    """Raise ValueError naming ``source`` and the field of the first NaN or infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{source}: field {where or '(top level)'} is {value}; results values "
                         "must be finite numbers (rerun the suite that wrote it)")
    if isinstance(value, dict):
        for key, item in value.items():
            check_finite(item, source, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_finite(item, source, f"{where}[{i}]")


Kind = tuple[str, Callable[[Any], bool]]  # (what a value should be, whether it is)
NUMBER: Kind = ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
INTEGER: Kind = ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool))
BOOLEAN: Kind = ("true or false", lambda v: isinstance(v, bool))
TEXT: Kind = ("a string", lambda v: isinstance(v, str))
OBJECT: Kind = ("an object", lambda v: isinstance(v, dict))
LIST: Kind = ("a list", lambda v: isinstance(v, list))
INTEGER_OR_NULL: Kind = ("an integer or null", lambda v: v is None or INTEGER[1](v))
FSDP_OUTCOME: Kind = (f"one of {', '.join(FSDP_OUTCOMES)}", lambda v: v in FSDP_OUTCOMES)
OPTIMIZER: Kind = (f"an optimizer name ({', '.join(REGISTRY)})",
                   lambda v: isinstance(v, str) and v in REGISTRY)

STATS = {"n": INTEGER, "mean": NUMBER, "min": NUMBER, "max": NUMBER, "spread": NUMBER}
TRAINING_FIELDS = {
    "config": {
        "max_iters": INTEGER, "hparams": {"<optimizer>": OBJECT},
        "runs": {"*": {"hparams": OBJECT}},
        "base": {"optimizer": OPTIMIZER, "dataset": TEXT, "learning_rate": NUMBER,
                 "weight_decay": NUMBER, "warmup_iters": INTEGER, "eval_iters": INTEGER,
                 "n_layer": INTEGER, "n_head": INTEGER, "n_embd": INTEGER, "block_size": INTEGER,
                 "batch_size": INTEGER, "max_iters": INTEGER, "grad_clip": NUMBER,
                 "dropout": NUMBER, "beta1?": NUMBER, "beta2?": NUMBER},
        "sample": {"prompt": TEXT, "max_new_tokens": INTEGER, "temperature": NUMBER,
                   "top_k": INTEGER, "seed": INTEGER}},
    "rows[]": {"label": TEXT, "optimizer": OPTIMIZER, "dataset": TEXT, "seed": INTEGER,
               "n_head": INTEGER, "n_kv_head": INTEGER, "warmup_iters?": INTEGER,
               "learning_rate": NUMBER, "weight_decay": NUMBER, "final_val_loss": NUMBER,
               "final_val_loss_whole_split?": NUMBER, "median_ms_per_iter": NUMBER,
               "sample?": TEXT, "evals[]": {"iter": INTEGER, "val_loss": NUMBER}},
    "summary": {"*": {"optimizer_state_bytes": INTEGER, "final_train_loss": STATS,
                      "final_val_loss": STATS, "final_val_loss_whole_split?": STATS}},
}
READ_FIELDS = {  # suite -> the fields the report reads from a file of its current rows
    "training": TRAINING_FIELDS,
    "training_bpe": TRAINING_FIELDS,
    "training_peers": TRAINING_FIELDS,
    "optimizer_state": {
        "rows[]": {"shape": LIST, "optimizer": OPTIMIZER, "dtype?": TEXT,
                   "ratio_to_adamw": NUMBER, "live_bytes": INTEGER, "analytic_bytes": INTEGER}},
    "step_time": {
        "rows[]": {"optimizer": OPTIMIZER},
        # "?": null where it does not apply (no compile, no refresh, the model's own shapes)
        "rows[test_step_time]": {
            "model": TEXT, "timed_shapes?": TEXT, "shape_note?": TEXT, "first_step_s?": NUMBER,
            "compile_s?": NUMBER, "refresh_interval?": INTEGER, "refresh_step_median_s?": NUMBER},
        "summary": {"*": {"<optimizer>": {
            "interleaved_median_s": NUMBER, "ratio_to_adamw": NUMBER,
            "ratio_to_adamw_foreach": NUMBER, "fraction_of_floor": NUMBER,
            "amortized_ratio_to_adamw": NUMBER, "refresh_ratio_to_adamw?": NUMBER,
            "compile_s?": NUMBER, "shape_note?": TEXT}}}},
    "kv_cache": {
        "rows[]": {"test": TEXT},
        "rows[test_decode]": {
            "attention": TEXT, "dtype": TEXT, "n_head": INTEGER, "n_kv_head": INTEGER,
            "seq_len": INTEGER, "n_layer": INTEGER, "bytes_read_per_token": NUMBER,
            "time_per_layer_s": NUMBER, "gb_per_s": NUMBER, "llc_bytes": NUMBER,
            "llc_source": TEXT},
        "rows[test_model_shape]": {
            "model": TEXT, "n_layer": INTEGER, "n_head": INTEGER, "n_kv_head": INTEGER,
            "head_dim": INTEGER, "bytes_per_token": INTEGER, "fraction_of_mha": NUMBER,
            "gib_per_32k_context": NUMBER},
        "summary": {
            "decode_ratio_to_mha[]": {"attention": TEXT, "dtype": TEXT, "n_head": INTEGER,
                                      "n_kv_head": INTEGER, "seq_len": INTEGER,
                                      "time_ratio_to_mha": NUMBER, "bytes_ratio_to_mha": NUMBER},
            "decode_faster_attention_by_dtype?": {"*": OBJECT}}},
    "sharded": {
        "config": {"equivalence_steps": INTEGER, "exact_tolerance": NUMBER,
                   "exact_rounding_factor": NUMBER},
        "rows[]": {"model": TEXT, "optimizer": OPTIMIZER, "world_size": INTEGER, "works": BOOLEAN,
                   "error?": TEXT, "n_params": INTEGER, "batch_per_rank": INTEGER,
                   "block_size": INTEGER, "threads_per_rank": INTEGER, "cpu_cores": INTEGER,
                   "state_bytes_per_rank[]?": INTEGER, "analytic_state_bytes_per_rank[]?": INTEGER,
                   "step_peak_bytes_per_rank[]?": INTEGER_OR_NULL,
                   "step_median_s_per_rank[]?": NUMBER, "collective_share_per_rank[]?": NUMBER,
                   "step_time_ratio?": NUMBER, "max_param_rel_diff?": NUMBER,
                   "micro_batch_rel_diff?": NUMBER,
                   "step_peak_method?": TEXT, "collective_method": TEXT,
                   "classification": FSDP_OUTCOME, "state_formula_holds?": BOOLEAN},
        "summary": {"<optimizer>": {"classification": FSDP_OUTCOME, "error?": TEXT,
                                    "max_param_rel_diff?": NUMBER,
                                    "micro_batch_rel_diff?": NUMBER, "world_sizes[]": INTEGER}}},
    "lr_sweep": {
        "config": {"max_iters": INTEGER, "base": {"eval_iters": INTEGER},
                   "variant_of?": OPTIMIZER},
        # a diverged run's losses are null
        "rows[]": {"optimizer": OPTIMIZER, "learning_rate": NUMBER, "weight_decay": NUMBER,
                   "final_val_loss?": NUMBER, "final_val_loss_whole_split?": NUMBER,
                   "diverged?": BOOLEAN, "diverged_at?": INTEGER,
                   "variant?": TEXT, "git_commit?": TEXT},
        "summary": {
            "best": {"<optimizer>": {"learning_rate": NUMBER, "weight_decay": NUMBER,
                                     "final_train_loss": NUMBER, "final_val_loss": NUMBER}},
            "variants?": {"*": {"final_train_loss": NUMBER, "final_val_loss": NUMBER,
                                "val_loss_change": NUMBER}}}},
}


def check_fields(value: Any, spec: dict | Kind, source: str, where: str = "") -> None:
    """Raise ValueError naming ``source`` and the first field of ``value`` that is missing
    or not of the kind ``spec`` gives it.

    ``spec`` is a kind, or an object's fields by name: "name?" may be missing or null, "*"
    is every field, "<optimizer>" every field, named after an optimizer, "name[]" every item
    of a list and "name[prefix]" every item whose "test" starts with prefix.
    """
    if isinstance(spec, tuple):
        description, ok = spec
        if not ok(value):
            raise ValueError(f"{source}: field {where or '(top level)'} is "
                             f"{reprlib.repr(value)}, not {description}; rerun the suite that "
                             "wrote it")
        return
    check_fields(value, OBJECT, source, where)
    for key, inner in spec.items():
        optional = key.endswith("?")
        name, is_list, test = key.removesuffix("?").removesuffix("]").partition("[")
        if name in ("*", "<optimizer>"):
            fields = list(value.items())
        elif name in value:
            fields = [(name, value[name])]
        elif optional:
            continue
        else:
            raise ValueError(f"{source}: field {where + '.' if where else ''}{name} is missing; "
                             "rerun the suite that wrote it")
        for field, item in fields:
            path = f"{where}.{field}" if where else field
            if name == "<optimizer>":
                check_fields(field, OPTIMIZER, source, path)
            if item is None and optional:
                continue
            if is_list:
                check_fields(item, LIST, source, path)
                for i, element in enumerate(item):
                    if not test or str(element.get("test", "")).startswith(test):
                        check_fields(element, inner, source, f"{path}[{i}]")
            else:
                check_fields(item, inner, source, path)


def read_checked(path: Path) -> dict:
    """A results file, with the fields the report reads checked (a file of older rows is
    only named as such, so only its schema is)."""
    document = read_results(path)
    check_finite(document, str(path))
    if is_current(document):
        check_fields(document, READ_FIELDS.get(document["suite"], {}), str(path))
    return document


def load_results(results_dir: Path) -> dict[str, dict]:
    """Published results per suite, validated; raises when there are none to report."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results directory {results_dir} does not exist; pass "
                                "--results-dir with a directory of <suite>.json files")
    found = {suite: read_checked(results_dir / f"{suite}.json") for suite in SUITES
             if (results_dir / f"{suite}.json").is_file()}
    if not found:
        raise FileNotFoundError(
            f"results directory {results_dir} holds no results files (one of "
            f"{', '.join(s + '.json' for s in SUITES)}); run python -m pytest bench "
            "--benchmark-only --profile full to make them")
    return found


def decode_rows(kv: dict) -> list[dict]:
    return [r for r in kv["rows"] if r["test"].startswith("test_decode")]


def current(results: dict[str, dict], suite: str) -> dict | None:
    """The suite's document when it is published with its current rows, else None."""
    document = results.get(suite)
    return document if document is not None and is_current(document) else None


def pending(results: dict[str, dict], suite: str) -> str:
    """What a block says in place of a suite that is missing or has older rows."""
    if suite not in results:
        return f"_Not yet published: run `{run_command(suite)}`._"
    return (f"_Not yet measured with this suite's current rows: run `{run_command(suite)}`, "
            "then `python -m bench.report`._")


# ---- formatting -----------------------------------------------------------------------

def num(value: float, fmt: str, field: str) -> str:
    """``value`` formatted; a NaN or infinity (e.g. a ratio over zero) is an error."""
    if not math.isfinite(value):
        raise ValueError(f"{field} is {value}: cannot report it")
    text = format(value, fmt)
    return text[1:] if re.fullmatch(r"[-+]0\.?0*%?", text) else text  # no signed zero


def ratio(a: float, b: float, field: str) -> float:
    if b == 0:
        raise ValueError(f"{field}: division by zero")
    return a / b


def mean_spread(stats: dict, field: str, fmt: str = ".4f") -> str:
    """Mean ± half the spread (max - min) over seeds; the mean alone for one seed."""
    if stats["n"] == 1:
        return num(stats["mean"], fmt, field)
    return f"{num(stats['mean'], fmt, field)} ± {num(stats['spread'] / 2, fmt, field)}"


def mean_range(stats: dict, field: str) -> str:
    if stats["n"] == 1:
        return num(stats["mean"], ".4f", field)
    return (f"{num(stats['mean'], '.4f', field)} ({num(stats['min'], '.4f', field)} to "
            f"{num(stats['max'], '.4f', field)})")


def table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str) -> str:
    """A Markdown table; ``align`` has one character per column, "l" or "r"."""
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def duration(env: dict) -> str | None:
    try:
        start = datetime.fromisoformat(env["utc_time"])
        end = datetime.fromisoformat(env["finished_utc_time"])
    except (KeyError, TypeError, ValueError):
        return None
    minutes = round((end - start).total_seconds() / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


# ---- training runs ----------------------------------------------------------------------

def kv_layout(n_head: int, n_kv_head: int) -> str:
    if n_kv_head == n_head:
        return "MHA"
    if n_kv_head == 1:
        return "MQA, 1 K/V head"
    return f"GQA, {n_kv_head} K/V heads"


def estimate(document: dict) -> str:
    """How nanoGPT's loss estimate of ``document``'s runs is taken."""
    return f"{document['config']['base']['eval_iters']} batches"


def run_label(row: dict, base: dict) -> str:
    """A training run's name for people: the optimizer's label, then what differs from
    the baby config other than lr and weight decay (which tables give in a column)."""
    extras = []
    if row["n_kv_head"] != row["n_head"]:
        extras.append(kv_layout(row["n_head"], row["n_kv_head"]))
    if row["dataset"] != "char":
        extras.append("GPT-2 BPE")
    if row.get("warmup_iters", base["warmup_iters"]) != base["warmup_iters"]:
        extras.append(f"{row['warmup_iters']} warmup iterations")
    return ", ".join([label(row["optimizer"]), *extras])


def first_rows(training: dict) -> dict[str, dict]:
    """Each training run's first row (its first seed), by run label."""
    first: dict[str, dict] = {}
    for r in training["rows"]:
        first.setdefault(r["label"], r)
    return first


def headline_labels(training: dict) -> list[str]:
    """Char-level runs at exactly their optimizer's tuned settings (the suite's
    ``hparams``), GQA and MQA included: not the other lrs, warmups or ablations."""
    config = training["config"]
    return [run for run, r in first_rows(training).items()
            if r["dataset"] == "char"
            and config["runs"][run]["hparams"] == config["hparams"][r["optimizer"]]]


def tuned_run(training: dict, optimizer: str, n_kv_head: int | None = None) -> str | None:
    """The headline run of ``optimizer`` with ``n_kv_head`` K/V heads (None: MHA)."""
    for run in headline_labels(training):
        r = first_rows(training)[run]
        if r["optimizer"] == optimizer and r["n_kv_head"] == (n_kv_head or r["n_head"]):
            return run
    return None


def whole_split(stats: dict) -> dict:
    """The whole-split val loss where the run has it, else nanoGPT's 20-batch estimate."""
    return stats.get("final_val_loss_whole_split", stats["final_val_loss"])


def baseline_run(training: dict) -> str | None:
    """The run at ``python -m memeff.train``'s defaults (nanoGPT's baby config)."""
    base = training["config"]["base"]
    for run, r in first_rows(training).items():
        if (r["optimizer"] == base["optimizer"] and r["dataset"] == base["dataset"]
                and r["n_kv_head"] == r["n_head"] and not r.get("optimizer_hparams")
                and r["learning_rate"] == base["learning_rate"]
                and r["weight_decay"] == base["weight_decay"]
                and r.get("warmup_iters", base["warmup_iters"]) == base["warmup_iters"]):
            return run
    return None


def kv_share_of_mha(base: dict, n_kv_head: int) -> float:
    """KV-cache bytes with ``n_kv_head`` K/V heads over MHA's, from memeff's formula."""
    import torch

    from memeff.memory import kv_cache_bytes

    def cache(k: int) -> int:
        shape = SimpleNamespace(n_layer=base["n_layer"], n_head=base["n_head"], n_kv_head=k,
                                n_embd=base["n_embd"])
        return kv_cache_bytes(shape, 1, base["block_size"], torch.float32)

    return cache(n_kv_head) / cache(base["n_head"])


# ---- README.md blocks -------------------------------------------------------------------

def headline_block(results: dict[str, dict], data_link: Callable[[str], str]) -> str:
    training = results.get("training")
    if training is None:
        return pending(results, "training")
    summary, first, base = training["summary"], first_rows(training), training["config"]["base"]
    step = current(results, "step_time")
    models = sorted(step["summary"]) if step else []
    sharded = current(results, "sharded")
    adamw_run = tuned_run(training, BASELINE)
    adamw_state = summary[adamw_run]["optimizer_state_bytes"] if adamw_run else None

    peers = current(results, "training_peers")
    peers_reason = None if peers is None else not_comparable(training, peers)
    shapes = step_rows(step) if step else {}
    rows, seeds = [], set()
    budget_shapes: dict[str, str] = {}  # timed shapes -> their footnote mark
    for name in OPTIMIZER_NAMES + PEER_NAMES:
        document = training if name in OPTIMIZER_NAMES else peers
        run = None if document is None else tuned_run(document, name)
        if name in OPTIMIZER_NAMES and run is None:
            continue
        if name in PEER_NAMES and run is None and not any(
                name in step["summary"][m] for m in models) and not (
                sharded and name in sharded["summary"]):
            continue  # a peer measured nowhere yet
        if run is None:
            loss_cell = state_cell = "not yet measured" if document is None else "n/a"
        else:
            loss = whole_split(document["summary"][run])
            loss_cell = mean_spread(loss, f"{document['suite']} {run} val loss")
            if document is training or peers_reason is None:
                seeds.add(loss["n"])
            else:
                loss_cell += f" ({peers_reason})"
            state = document["summary"][run]["optimizer_state_bytes"]
            state_cell = ("n/a" if adamw_state is None else num(
                100 * ratio(state, adamw_state, f"{document['suite']} {run} state"), ".1f", run) + "%")
        cells = [optimizer_cell(name), loss_cell, state_cell]
        for model in models:
            entry = step["summary"][model].get(name)
            if entry is None:
                cells.append("n/a")
                continue
            timed = shapes.get((model, name), {}).get("timed_shapes") or model
            mark = ""
            if timed != model:  # a footnote mark per set of shapes timed in place of a model's
                budget_shapes.setdefault(timed, "†" * (len(budget_shapes) + 1))
                mark = budget_shapes[timed]
            cells.append(num(entry["amortized_ratio_to_adamw"], ".2f", f"step_time {model} {name}")
                         + "x" + mark)
        if not models:
            cells.append("not yet measured")
        cells.append(fsdp_cell(sharded, name))
        rows.append(cells)
    step_header = ([f"step time / {label(BASELINE)}, {m}" for m in models] if models
                   else [f"step time / {label(BASELINE)}"])
    parts = [table(["optimizer", "final val loss, whole split", f"optimizer state, % of {label(BASELINE)}",
                    *step_header, "works under FSDP2"], rows, "lrr" + "r" * len(step_header) + "l")]

    layout_rows = []
    for run in headline_labels(training):
        r = first[run]
        if r["optimizer"] != BASELINE:
            continue
        layout_rows.append((r["n_kv_head"] == r["n_head"], -r["n_kv_head"], [
            kv_layout(r["n_head"], r["n_kv_head"]), f"{r['n_kv_head']} of {r['n_head']}",
            mean_spread(whole_split(summary[run]), f"training {run} val loss"),
            num(100 * kv_share_of_mha(base, r["n_kv_head"]), ".0f", run) + "%"]))
    layout_rows.sort(key=lambda t: (not t[0], t[1]))
    parts.append(table(["attention layout", "K/V heads",
                        f"final val loss, whole split, trained with {label(BASELINE)}",
                        "KV cache, % of MHA"], [t[2] for t in layout_rows], "lrrr"))

    n = ", ".join(str(s) for s in sorted(seeds))
    note = (f"Baby GPT on Tiny Shakespeare (characters), {training['config']['max_iters']} "
            f"iterations, each optimizer at the lr and weight decay its sweep chose; loss is "
            f"mean ± half the range over {n} seeds; state is the whole model's optimizer state.")
    note += " Peers (other packages' optimizers, each at the best point of its own lr sweep) in italics"
    if peers is None:
        waiting = pending(results, "training_peers").strip("_")
        note += "; their training runs: " + waiting[0].lower() + waiting[1:]
    elif peers_reason is not None:
        note += (f"; their training runs are of {peers_reason}, not comparable: run "
                 f"`{run_command('training_peers')}`.")
    else:
        note += f" ([training_peers.json]({data_link('training_peers')}))."
    if step:
        note += (" Step time: interleaved medians of a whole-model step, a projector's refresh "
                 f"spread over its interval ([step_time.json]({data_link('step_time')}))")
        for timed, mark in budget_shapes.items():
            note += f"; {mark}: timed on {timed}, the model's own shapes past the time budget"
        note += "."
    else:
        waiting = pending(results, "step_time").strip("_")
        note += " Step time: " + waiting[0].lower() + waiting[1:]
    if sharded:
        sizes = " and ".join(map(str, sharded_world_sizes(sharded))) or "no more than 1"
        note += (f" Under FSDP2: the largest relative difference of a parameter from one "
                 f"process's after {sharded['config']['equivalence_steps']} steps on {sizes} "
                 f"processes; {exact_rule(sharded)} ([sharded.json]({data_link('sharded')})).")
    else:
        waiting = pending(results, "sharded").strip("_")
        note += " Under FSDP2: " + waiting[0].lower() + waiting[1:]
    parts.append(note)
    return "\n\n".join(parts)


def sharded_world_sizes(sharded: dict) -> list[int]:
    return sorted({n for entry in sharded["summary"].values() for n in entry["world_sizes"]})


def exact_rule(sharded: dict) -> str:
    config = sharded["config"]
    return (f"exact: at most {config['exact_tolerance']:g}, or {config['exact_rounding_factor']:g} "
            "times what accumulating the same batch in micro-batches changes in one process")


def row_outcome(row: dict) -> str:
    """A sharded row's :data:`FSDP_OUTCOMES` entry; "one process" for N = 1."""
    return "one process" if row["world_size"] == 1 else row["classification"]


def error_kind(error: str | None) -> str:
    """The exception's name at the start of an error message, else the message's first
    words: what a table cell has room for."""
    found = re.match(r"\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit))\b", error or "")
    if found:
        return found.group(1).rsplit(".", 1)[-1]
    words = (error or "no error recorded").split()
    return " ".join(words[:4]) + (" ..." if len(words) > 4 else "")


def fsdp_cell(sharded: dict | None, name: str) -> str:
    """Whether ``name`` runs under FSDP2 and how far from one process it ends: exact, runs
    but differs, or fails (and with what); "n/a" for an optimizer the suite did not run."""
    if sharded is None:
        return "not yet measured"
    entry = sharded["summary"].get(name)
    if entry is None:
        return "n/a"
    outcome = entry["classification"]
    if outcome == "fails":
        return f"no: fails ({error_kind(entry.get('error')).replace('`', '')})"
    diff = entry.get("max_param_rel_diff")
    diff = "n/a" if diff is None else num(diff, ".0e", f"sharded {name} max_param_rel_diff")
    return f"yes, exact to {diff}" if outcome == "exact" else f"runs, but off by {diff}"


def figure_link(name: str, alt: str, link: Callable[[str], str]) -> str:
    return f"![{alt}]({link(name)})"


def readme_figures_block(results: dict[str, dict], link: Callable[[str], str]) -> str:
    parts = []
    for name in ("loss_vs_state.png", "step_time_ratio.png", "decode_time.png"):
        suite, _, alt = FIGURES[name]
        parts.append(figure_link(name, alt, link) if current(results, suite)
                     else f"{alt}: {pending(results, suite)}")
    return "\n\n".join(parts)


# ---- results/README.md blocks -----------------------------------------------------------

def provenance_block(results: dict[str, dict], data_link: Callable[[str], str],
                     matplotlib_version: str) -> str:
    rows = []
    for suite in SUITES:
        doc = results.get(suite)
        if doc is None:
            rows.append([f"`{suite}`", "not published", "", "", "", ""])
            continue
        env = doc["environment"]
        dirty = " (uncommitted changes)" if env.get("git_dirty") else ""
        device = env.get("gpu") or env["cpu"]
        if env.get("cpu_capability"):
            device += f" ({env['cpu_capability']})"
        threads = f"{env['torch_threads']} thread{'s' if env['torch_threads'] != 1 else ''}"
        took = duration(env)
        status = "" if is_current(doc) else " (older rows: not shown)"
        rows.append([f"[`{suite}`]({data_link(suite)}){status}", f"`{doc['profile']}`",
                     env["utc_time"] + (f", {took}" if took else ""),
                     f"`{(env.get('git_commit') or 'unknown')[:7]}`{dirty}",
                     f"torch {env['torch']}", f"{device}, {threads}"])
    return (table(["suite", "profile", "started (UTC), duration", "commit", "software", "device"],
                  rows, "llllll")
            + f"\n\nFigures drawn with matplotlib {matplotlib_version}.")


REFERENCE_ROWS = (  # (run, final train loss, final val loss): reported elsewhere, not runs here
    ("nanoGPT's train.py, AdamW, lr 1e-3, weight decay 0.1, 1 run on this project's CPU", 1.7648, 1.8857),
    ("an earlier GQA+AdamSN+Adafactor fork of nanoGPT, its table: Adam", 1.8104, 1.9353),
    ("the same fork's table: AdamSN, lr 1e-2", 2.3133, 2.3416),
    ("the same fork's table: Adafactor", 1.8116, 1.9338),
)


def baseline_block(results: dict[str, dict]) -> str:
    training = results.get("training")
    if training is None:
        return pending(results, "training")
    base, summary = training["config"]["base"], training["summary"]
    run = baseline_run(training)
    intro = (f"`python -m memeff.train` with its defaults is nanoGPT's baby GPT: {base['n_layer']} "
             f"layers, {base['n_head']} heads, n_embd {base['n_embd']}, context "
             f"{base['block_size']}, batch {base['batch_size']}, {base['max_iters']} iterations, "
             f"{label(base['optimizer'])} at lr {base['learning_rate']:g} with "
             f"{base['warmup_iters']} warmup iterations and a cosine to a tenth of it, "
             + "".join(f"{name} {base[name]:g}, " for name in ("beta1", "beta2")
                       if base.get(name) is not None)
             + f"weight decay {base['weight_decay']:g}, gradient clip {base['grad_clip']:g}, "
             f"dropout {base['dropout']:g}.")
    rows = []
    for name in OPTIMIZER_NAMES:  # every optimizer at nanoGPT's settings, where trained
        for label_, r in first_rows(training).items():
            if (r["optimizer"] == name and r["dataset"] == "char" and r["n_kv_head"] == r["n_head"]
                    and r["learning_rate"] == base["learning_rate"]
                    and r["weight_decay"] == base["weight_decay"]
                    and r.get("warmup_iters", base["warmup_iters"]) == base["warmup_iters"]):
                runs = [x for x in training["rows"] if x["label"] == label_]
                ms = ", ".join(num(x["median_ms_per_iter"], ".1f", f"{label_} ms/iter") for x in runs)
                shared = {(x.get("concurrent_runs", 1), x.get("torch_threads")) for x in runs}
                how = "; ".join(f"{c} run{'s' if c != 1 else ''} at once, {t} thread{'s' if t != 1 else ''} each"
                                for c, t in sorted(shared, key=str) if t is not None)
                stats = summary[label_]
                rows.append([f"memeff, {label(name)}" + (" (`python -m memeff.train --seed S`)"
                                                         if label_ == run else ""),
                             ", ".join(str(x["seed"]) for x in runs),
                             mean_range(stats["final_train_loss"], label_),
                             mean_range(stats["final_val_loss"], label_),
                             mean_range(stats["final_val_loss_whole_split"], label_)
                             if "final_val_loss_whole_split" in stats else "n/a",
                             ms + (f" ({how})" if how else "")])
    for name, train_loss, val_loss in REFERENCE_ROWS:
        rows.append([f"*not ours:* {name}", "", f"{train_loss:.4f}", f"{val_loss:.4f}", "", ""])
    return "\n\n".join([intro, table(
        ["run", "seeds", "final train loss", f"final val loss ({estimate(training)})",
         "final val loss, whole split", "median ms/iter per seed"], rows, "llrrrl")])


# the baby config's settings that make two training suites' runs one problem (not the
# optimizer's own: lr, weight decay, betas; nor how the run is launched or logged)
PROBLEM_SETTINGS = ("dataset", "n_layer", "n_head", "n_embd", "block_size", "bias", "dropout",
                    "batch_size", "grad_accum_steps", "warmup_iters", "lr_decay_iters",
                    "grad_clip", "eval_iters")


def not_comparable(training: dict, other: dict) -> str | None:
    """Why ``other``'s runs (the peers') cannot be set beside ``training``'s, else None."""
    mine, theirs = other["config"], training["config"]
    if mine["max_iters"] != theirs["max_iters"]:
        return f"{mine['max_iters']} iterations against {theirs['max_iters']}"
    differing = [k for k in PROBLEM_SETTINGS if mine["base"].get(k) != theirs["base"].get(k)]
    return f"other settings ({', '.join(differing)})" if differing else None


def peers_pending(results: dict[str, dict]) -> str | None:
    """What a block says of the peers' training runs when they are not published."""
    if current(results, "training_peers") is not None:
        return None
    waiting = pending(results, "training_peers").strip("_")
    return "Peers' training runs: " + waiting[0].lower() + waiting[1:]


def training_block(training: dict, bpe: dict | None, link: Callable[[str], str],
                   peers: dict | None = None) -> str:
    """Every run: losses over seeds, optimizer-state bytes, KV cache; the GPT-2 BPE runs
    (their own suite) after the char-level ones, then the peers' (theirs too), whose
    state is a share of the char-level AdamW's."""
    base = training["config"]["base"]
    rows, adamw_state = [], {}
    for document in (training, bpe, peers):
        if document is None:
            continue
        summary, first = document["summary"], first_rows(document)
        adamw_state.update({r["dataset"]: summary[run]["optimizer_state_bytes"]
                            for run, r in first.items()
                            if r["optimizer"] == BASELINE and r["n_kv_head"] == r["n_head"]})
        iterations = ("" if document["config"]["max_iters"] == training["config"]["max_iters"]
                      else f", {document['config']['max_iters']} iterations")
        for run, r in first.items():
            stats, state = summary[run], summary[run]["optimizer_state_bytes"]
            whole = stats.get("final_val_loss_whole_split")
            share = ("n/a" if r["dataset"] not in adamw_state else
                     num(100 * ratio(state, adamw_state[r["dataset"]], run), ".1f", run) + "%")
            name = run_label(r, base) + iterations
            rows.append([f"*{name}*" if r["optimizer"] in PEER_NAMES else name,
                         f"{r['learning_rate']:g} / {r['weight_decay']:g}",
                         str(stats["final_val_loss"]["n"]),
                         mean_spread(stats["final_train_loss"], f"{run} train loss"),
                         mean_spread(stats["final_val_loss"], f"{run} val loss"),
                         "n/a" if whole is None else mean_spread(whole, f"{run} whole split"),
                         f"{state:,} B", share,
                         num(100 * r["n_kv_head"] / r["n_head"], ".0f", run) + "%"])
    parts = [table(["run", "lr / weight decay", "seeds", "final train loss",
                    f"final val loss ({estimate(training)})", "final val loss, whole split",
                    "optimizer state", f"% of {label(BASELINE)}", "KV cache, % of MHA"],
                   rows, "llrrrrrrr")]
    if peers is not None:
        reason = not_comparable(training, peers)
        parts.append("Peers (other packages' optimizers, each at the best point of its own lr "
                     "sweep) in italics." + (f" Their runs are of {reason}: not comparable with "
                                             f"ours." if reason else ""))
    parts += [figure_link("loss_curves.png", FIGURES["loss_curves.png"][2], link),
              figure_link("loss_vs_state.png", FIGURES["loss_vs_state.png"][2], link)]
    return "\n\n".join(parts)


def seed_gaps(runs: list[dict], by_seed: dict[int, dict]) -> list[tuple[int, float]]:
    """(seed, whole-split val loss minus the reference's at that seed) for each of ``runs``
    whose seed the reference has, both with a whole-split loss."""
    key = "final_val_loss_whole_split"
    return [(r["seed"], r[key] - by_seed[r["seed"]][key]) for r in runs
            if r["seed"] in by_seed and key in r and key in by_seed[r["seed"]]]


def paired_gaps_block(training: dict, peers: dict | None = None) -> str:
    """Each headline run's whole-split loss minus AdamW's at the same seed; the peers' runs
    (their own suite) against the same AdamW runs, where they are comparable."""
    base = training["config"]["base"]
    reference = tuned_run(training, BASELINE)
    if reference is None:
        return f"_No {label(BASELINE)} run at its tuned settings in the training results._"
    by_seed = {r["seed"]: r for r in training["rows"] if r["label"] == reference}
    runs = [(training, run) for run in headline_labels(training) if run != reference]
    reason = None if peers is None else not_comparable(training, peers)
    if peers is not None and reason is None:
        runs += [(peers, run) for run in headline_labels(peers)]
    rows = []
    for document, run in runs:
        seeds = [r for r in document["rows"] if r["label"] == run]
        gaps = seed_gaps(seeds, by_seed)
        if not gaps:
            continue
        mean = sum(g for _, g in gaps) / len(gaps)
        name = run_label(seeds[0], base)
        rows.append([f"*{name}*" if seeds[0]["optimizer"] in PEER_NAMES else name,
                     num(mean, "+.4f", f"{run} gap"),
                     ", ".join(f"{seed}: {num(g, '+.4f', f'{run} gap')}" for seed, g in gaps)])
    text = table(["run", f"minus {label(BASELINE)}, mean", "per seed"], rows, "lrl")
    if reason is not None:
        text += (f"\n\nPeers (other packages' optimizers) not paired: their runs are of "
                 f"{reason}; run `{run_command('training_peers')}`.")
    elif peers is not None:
        text += "\n\nPeers (other packages' optimizers) in italics."
    return text


def samples_block(training: dict) -> str:
    """The text each char-level run's first seed generates, with how it was generated."""
    sample, base = training["config"]["sample"], training["config"]["base"]
    parts = [f"Prompt `{sample['prompt']}`, {sample['max_new_tokens']} new characters, "
             f"temperature {sample['temperature']}, top-k {sample['top_k']}, sampling seed "
             f"{sample['seed']}, KV-cache generation from each run's final checkpoint (training "
             f"seed {training['seeds'][0]}):"]
    for r in training["rows"]:
        if r.get("sample") is not None and r["dataset"] == "char":
            text = r["sample"].replace("`", "'")  # keeps the code fence intact
            parts.append(f"**{run_label(r, base)}**, lr {r['learning_rate']:g}, val loss "
                         f"{num(r['final_val_loss'], '.4f', r['label'])}:\n\n```text\n{text}\n```")
    return "\n\n".join(parts)


def float32_rows(state: dict) -> list[dict]:
    """Optimizer-state rows of float32 parameters (rows from before the dtype axis are)."""
    return [r for r in state["rows"] if r.get("dtype", "torch.float32") == "torch.float32"]


def state_table(rows: list[dict], names: Sequence[str]) -> str:
    """One row per optimizer of ``names`` measured in ``rows``, one column per parameter
    shape any of them was measured on: its state as a share of AdamW's."""
    names = [n for n in names if any(r["optimizer"] == n for r in rows)]
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in rows if r["optimizer"] in names))
    by_key = {(tuple(r["shape"]), r["optimizer"]): r for r in rows}
    body = []
    for name in names:
        cells = [label(name)]
        for shape in shapes:
            r = by_key.get((shape, name))
            cells.append("n/a" if r is None else
                         num(100 * r["ratio_to_adamw"], ".2f", f"optimizer_state {shape} {name}") + "%")
        body.append(cells)
    return table(["optimizer", *("x".join(map(str, s)) for s in shapes)], body,
                 "l" + "r" * len(shapes))


def state_block(state: dict, link: Callable[[str], str]) -> str:
    """Ours (and torch's) and the peers in two tables: optimizers down, parameter shapes
    across (the peers over the shapes their profile measures)."""
    rows = [r for r in float32_rows(state) if "subset_size" not in r]
    ours = [n for n in REGISTRY if n not in PEER_NAMES]
    agree = all(r["live_bytes"] == r["analytic_bytes"] for r in state["rows"])
    parts = [state_table(rows, ours)]
    if any(r["optimizer"] in PEER_NAMES for r in rows):
        parts += ["Peers (other packages' optimizers):", state_table(rows, PEER_NAMES)]
    parts.append("Measured bytes of the state tensors as a share of AdamW's, float32 "
                 "parameters; " + ("on every row the live tensors hold exactly the bytes of the "
                                   "formula." if agree else
                                   "**some rows' live tensors differ from the formula.**"))
    subsets = [r for r in float32_rows(state) if "subset_size" in r]
    if subsets:
        sizes = list(dict.fromkeys(str(r["subset_size"]) for r in subsets))
        sub_shapes = list(dict.fromkeys(tuple(r["shape"]) for r in subsets))
        by = {(tuple(r["shape"]), str(r["subset_size"])): r for r in subsets}
        parts.append(f"{label('adamsn')} by subset size (elements per subset of the second moment):")
        parts.append(table(["parameter shape", *sizes], [
            ["x".join(map(str, s)), *("n/a" if (s, k) not in by else
                                      num(100 * by[(s, k)]["ratio_to_adamw"], ".2f", f"subset {k}") + "%"
                                      for k in sizes)] for s in sub_shapes], "l" + "r" * len(sizes)))
    parts.append(figure_link("optimizer_state_ratio.png", FIGURES["optimizer_state_ratio.png"][2], link))
    return "\n\n".join(parts)


def kernels_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {kernels_text(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(kernels_text(v) for v in value)
    return str(value)


def optimizer_cell(name: str) -> str:
    """An optimizer's label in a table; a peer's (another package's optimizer) in italics."""
    return f"*{label(name)}*" if name in PEER_NAMES else label(name)


def step_rows(step: dict) -> dict[tuple[str, str], dict]:
    """The step suite's whole-model rows by (model, optimizer)."""
    return {(r["model"], r["optimizer"]): r for r in step["rows"]
            if r["test"].startswith("test_step_time")}


def seconds_cell(value: float | None, field: str) -> str:
    return "n/a" if value is None else num(value, ".2f", field)


def step_block(results: dict[str, dict], link: Callable[[str], str]) -> str:
    """Each optimizer's steady step against both AdamW forms (a projector's refresh also
    spread over its interval), then the one-off costs (first step, compile, a refresh
    step alone) of the optimizers that have them."""
    step = current(results, "step_time")
    if step is None:
        return pending(results, "step_time")
    by_key = step_rows(step)
    rows, once, notes = [], [], []
    for model in sorted(step["summary"]):
        for name in REGISTRY:
            e = step["summary"][model].get(name)
            if e is None:
                continue
            r = by_key.get((model, name), {})
            field = f"step_time summary {model} {name}"
            timed = r.get("timed_shapes") or model
            if timed != model:  # the model's own shapes would have taken too long
                notes.append(f"{label(name)} on {model}: "
                             f"{r.get('shape_note') or e.get('shape_note') or 'timed on ' + timed}.")
            amortized = ("" if e.get("refresh_ratio_to_adamw") is None else
                         num(e["amortized_ratio_to_adamw"], ".2f", field + " amortized") + "x")
            rows.append([timed, optimizer_cell(name),
                         num(e["interleaved_median_s"] * 1e3, ".2f", field + " interleaved_median_s"),
                         num(e["ratio_to_adamw"], ".2f", field + " ratio_to_adamw") + "x",
                         num(e["ratio_to_adamw_foreach"], ".2f", field + " ratio_to_adamw_foreach") + "x",
                         amortized,
                         num(100 * e["fraction_of_floor"], ".0f", field + " fraction_of_floor") + "%",
                         kernels_text(e.get("kernels"))])
            if e.get("compile_s") is not None or r.get("refresh_interval") is not None:
                refresh = r.get("refresh_step_median_s")
                once.append([timed, optimizer_cell(name),
                             seconds_cell(r.get("first_step_s"), field + " first_step_s"),
                             seconds_cell(e.get("compile_s"), field + " compile_s"),
                             "n/a" if r.get("refresh_interval") is None else str(r["refresh_interval"]),
                             "n/a" if refresh is None else num(refresh * 1e3, ".1f", field + " refresh"),
                             "n/a" if e.get("refresh_ratio_to_adamw") is None else
                             num(e["refresh_ratio_to_adamw"], ".1f", field + " refresh ratio") + "x"])
    parts = [table(["model", "optimizer", "step (ms)", f"/ {label(BASELINE)}",
                    f"/ {label('adamw_foreach')}", "with refreshes, / fused",
                    "of the bandwidth floor", "kernels"], rows, "llrrrrrl"),
             "Peers (other packages' optimizers) in italics. Step: the interleaved median of a "
             "step without a projector refresh; with refreshes: the refresh step spread over "
             "its interval, against the same fused AdamW median."]
    parts += notes
    if once:
        parts.append("One-off costs, kept out of the medians above: the first step (which makes "
                     "the state; for a torch.compile'd step, compiles), the cold compile's share "
                     "of it, and a step that refreshes the projector, timed alone:")
        parts.append(table(["model", "optimizer", "first step (s)", "compile (s)",
                            "refresh every (steps)", "refresh step (ms)",
                            f"refresh / {label(BASELINE)}"], once, "llrrrrr"))
    parts.append(figure_link("step_time_ratio.png", FIGURES["step_time_ratio.png"][2], link))
    return "\n\n".join(parts)


def mib(nbytes: float, fmt: str, field: str) -> str:
    return num(nbytes / 2**20, fmt, field) + " MiB"


def sharded_block(results: dict[str, dict], link: Callable[[str], str]) -> str:
    sharded = current(results, "sharded")
    if sharded is None:
        return pending(results, "sharded")
    rows = sharded["rows"]
    one_process = {(r["model"], r["optimizer"]): max(r["state_bytes_per_rank"]) for r in rows
                   if r["world_size"] == 1 and r["works"]}
    body = []
    for r in sorted(rows, key=lambda r: (r["model"], list(REGISTRY).index(r["optimizer"]),
                                         r["world_size"])):
        field = f"sharded {r['model']} {r['optimizer']} N={r['world_size']}"
        cells = [r["model"], optimizer_cell(r["optimizer"]), str(r["world_size"])]
        if not r["works"]:
            body.append(cells + ["n/a"] * 8 + [row_outcome(r)])
            continue
        state = max(r["state_bytes_per_rank"])
        base = one_process.get((r["model"], r["optimizer"]))
        peak = r["step_peak_bytes_per_rank"]
        cells += [mib(state, ".2f", field + " state"),
                  "n/a" if base is None else num(100 * ratio(state, base, field), ".1f", field) + "%",
                  "n/a" if not peak or None in peak else mib(max(peak), ".0f", field + " peak"),
                  num(1e3 * max(r["step_median_s_per_rank"]), ".0f", field + " step"),
                  num(r["step_time_ratio"], ".2f", field + " ratio") + "x",
                  num(100 * max(r["collective_share_per_rank"]), ".0f", field + " share") + "%",
                  num(r["max_param_rel_diff"], ".1e", field + " difference"),
                  num(r["micro_batch_rel_diff"], ".1e", field + " micro-batches"),
                  row_outcome(r)]
        body.append(cells)
    failures = {}
    for r in rows:
        if not r["works"]:
            failures.setdefault(r["optimizer"], (r["error"] or "").replace("`", "'"))
    first = next((r for r in rows if r["works"]), rows[0])
    threads = f"{first['threads_per_rank']} thread{'s' if first['threads_per_rank'] != 1 else ''}"
    differ = list(dict.fromkeys(  # optimizers whose live state is not their formula's bytes
        label(r["optimizer"]) for r in rows if r["works"] and not (
            r["state_formula_holds"] if r.get("state_formula_holds") is not None
            else r["state_bytes_per_rank"] == r["analytic_state_bytes_per_rank"])))
    notes = [
        f"{first['model']} ({first['n_params']:,} parameters; {first['batch_per_rank']} "
        f"sequences of {first['block_size']} random tokens per rank; {threads} per rank on "
        f"{first['cpu_cores']} cores: more ranks than cores share them). N = 1 is one process "
        "without FSDP2; above it each transformer block and the root are one `fully_shard` "
        "unit. State and peak memory are the largest rank's; "
        + ("on every rank the live state tensors hold exactly the formula's bytes. "
           if not differ else "**on some ranks the live state tensors differ from the formula: "
           f"{', '.join(differ)}.** ")
        + f"Peak memory: {first.get('step_peak_method') or 'n/a'}. Step: the slowest rank's "
        "median; / one process divides it by the slowest rank's median of a one-process step "
        "of the same local batch, timed in turn in the same processes. In collectives: "
        f"{first['collective_method']}. Difference: the largest relative difference of a "
        f"parameter from one process's after {sharded['config']['equivalence_steps']} steps "
        "on the same global batch; micro-batches: the same for one process that accumulates "
        f"that batch in N micro-batches (the order of summation alone); {exact_rule(sharded)}."]
    for name, error in failures.items():
        notes.append(f"{label(name)} fails under FSDP2: `{error}`")
    return "\n\n".join([
        table(["model", "optimizer", "ranks", "state per rank", "of N = 1", "peak memory per rank",
               "step (ms)", "/ one process", "in collectives", "difference", "micro-batches",
               "under FSDP2"], body, "llrrrrrrrrrl"),
        *notes,
        figure_link("sharded_state.png", FIGURES["sharded_state.png"][2], link)])


def kv_shapes_block(kv: dict) -> str:
    rows = [r for r in kv["rows"] if r["test"].startswith("test_model_shape")]
    return table(["model", "layers", "query heads", "K/V heads", "head dim", "bytes/token (bf16)",
                  "% of MHA", "GiB per 32k tokens"],
                 [[r["model"], str(r["n_layer"]), str(r["n_head"]), str(r["n_kv_head"]),
                   str(r["head_dim"]), f"{r['bytes_per_token']:,}",
                   num(100 * r["fraction_of_mha"], ".1f", f"{r['model']} fraction_of_mha") + "%",
                   num(r["gib_per_32k_context"], ".2f", f"{r['model']} gib_per_32k_context")]
                  for r in rows], "lrrrrrrr")


def decode_n_head(kv: dict) -> int:
    """The query-head count the decode table and figure show: the largest measured."""
    return max(r["n_head"] for r in decode_rows(kv))


def decode_block(results: dict[str, dict], link: Callable[[str], str]) -> str:
    kv = current(results, "kv_cache")
    if kv is None:
        return pending(results, "kv_cache")
    n_head = decode_n_head(kv)
    summary = kv["summary"]
    by = {}
    for r in decode_rows(kv):
        if r["n_head"] == n_head:
            by.setdefault((r["dtype"], r["seq_len"], r["n_kv_head"]), {})[r["attention"]] = r
    ratios = {(e["dtype"], e["seq_len"], e["n_kv_head"], e["attention"]): e
              for e in summary["decode_ratio_to_mha"] if e["n_head"] == n_head}
    attentions = sorted({a for paths in by.values() for a in paths})
    rows = []
    dtypes = sorted({key[0] for key in by}, reverse=True)  # float32 first
    for (dtype, seq_len, n_kv_head), paths in sorted(by.items(), key=lambda item: (
            dtypes.index(item[0][0]), item[0][1], -item[0][2])):
        any_row = next(iter(paths.values()))
        cells = [dtype.removeprefix("torch."), str(seq_len), str(n_kv_head), str(any_row["n_layer"]),
                 f"{any_row['bytes_read_per_token'] / 2**20:,.0f} MiB"]
        for a in attentions:
            r = paths.get(a)
            e = ratios.get((dtype, seq_len, n_kv_head, a))
            field = f"kv_cache {r['test'] if r else a}"
            cells.append("n/a" if r is None else
                         f"{num(r['time_per_layer_s'] * 1e3, '.3f', field)} ms, "
                         f"{num(r['gb_per_s'], '.1f', field)} GB/s"
                         + ("" if e is None else f", {num(e['time_ratio_to_mha'], '.2f', field)}x"))
        e = ratios.get((dtype, seq_len, n_kv_head, attentions[0])) if attentions else None
        cells.append("n/a" if e is None else num(e["bytes_ratio_to_mha"], ".3f", "bytes ratio"))
        rows.append(cells)
    wins = summary.get("decode_faster_attention_by_dtype", {})
    win_text = "; ".join(f"{dtype.removeprefix('torch.')}: " + ", ".join(
        f"`{a}` {n}" for a, n in counts.items()) for dtype, counts in sorted(wins.items()))
    llc = {(r["llc_bytes"], r["llc_source"]) for r in decode_rows(kv)}
    llc_text = ", ".join(f"{b / 2**20:g} MiB ({src})" for b, src in sorted(llc))
    return "\n\n".join([
        table(["dtype", "context", f"K/V heads of {n_head}", "layers", "cache read per token",
               *(f"`{a}`: per layer, GB/s, time / MHA's" for a in attentions),
               "bytes / MHA's"], rows, "lrrrr" + "r" * len(attentions) + "r"),
        f"Last-level cache: {llc_text}. GQA and MQA points each path decodes faster, "
        f"all query-head counts: {win_text or 'n/a'}.",
        figure_link("decode_time.png", FIGURES["decode_time.png"][2], link)])


def sweep_block(sweep: dict, link: Callable[[str], str]) -> str:
    best = sweep["summary"]["best"]
    rows = []
    for name, b in best.items():
        grid = [r for r in sweep["rows"] if r["optimizer"] == name and not r.get("variant")]
        diverged = sum(bool(r.get("diverged")) for r in grid)
        runs = f"{len(grid)} ({diverged} diverged)" if diverged else str(len(grid))
        rows.append([label(name), runs, f"{b['learning_rate']:g}", f"{b['weight_decay']:g}",
                     num(b["final_train_loss"], ".4f", f"lr_sweep best {name}"),
                     num(b["final_val_loss"], ".4f", f"lr_sweep best {name}")])
    return "\n\n".join([
        table(["optimizer", "runs", "best lr", "its weight decay", "final train loss",
               f"final val loss ({estimate(sweep)})"], rows, "lrrrrr"),
        figure_link("lr_sweep.png", FIGURES["lr_sweep.png"][2], link)])


def ablations_block(sweep: dict) -> str:
    variants = sweep["summary"].get("variants")
    if not variants:
        return "_No ablations in the sweep's results._"
    rows_by_variant = {r["variant"]: r for r in sweep["rows"] if r.get("variant")}
    rows = []
    for name, v in variants.items():
        r = rows_by_variant.get(name, {})
        whole = r.get("final_val_loss_whole_split")
        rows.append([f"`{name}`", f"`{(r.get('git_commit') or 'unknown')[:7]}`",
                     num(v["final_train_loss"], ".4f", f"lr_sweep {name}"),
                     num(v["final_val_loss"], ".4f", f"lr_sweep {name}"),
                     num(v["val_loss_change"], "+.4f", f"lr_sweep {name}"),
                     "n/a" if whole is None else num(whole, ".4f", f"lr_sweep {name}")])
    for name, r in rows_by_variant.items():
        if r.get("diverged"):
            rows.append([f"`{name}`", f"`{(r.get('git_commit') or 'unknown')[:7]}`",
                         f"diverged at iteration {r.get('diverged_at')}", "n/a", "n/a", "n/a"])
    return (f"{label(sweep['config']['variant_of'])} with one change at a time, at its best grid "
            "point (at the lr in the change's name where it has one), one seed:\n\n"
            + table(["change", "commit", "final train loss", f"final val loss ({estimate(sweep)})",
                     "vs the grid's best", "final val loss, whole split"], rows, "llrrrr"))


# ---- all blocks -------------------------------------------------------------------------

def blocks(results: dict[str, dict], link: Callable[[str], str], data_link: Callable[[str], str],
           matplotlib_version: str) -> dict[str, str]:
    """Marker name -> Markdown, for every block of both READMEs; ``link`` and ``data_link``
    give the path of a figure and of a suite's results file from the README."""
    training, sweep = results.get("training"), results.get("lr_sweep")
    state, kv = results.get("optimizer_state"), results.get("kv_cache")
    return {
        # README.md
        "headline": headline_block(results, data_link),
        "figures": readme_figures_block(results, link),
        # results/README.md
        "provenance": provenance_block(results, data_link, matplotlib_version),
        "baseline": baseline_block(results),
        "training": (with_note(training_block(training, results.get("training_bpe"), link,
                                              current(results, "training_peers")),
                               peers_pending(results))
                     if training else pending(results, "training")),
        "paired-gaps": (with_note(paired_gaps_block(training, current(results, "training_peers")),
                                  peers_pending(results))
                        if training else pending(results, "training")),
        "optimizer-state": state_block(state, link) if state else pending(results, "optimizer_state"),
        "step-time": step_block(results, link),
        "kv-shapes": kv_shapes_block(kv) if kv else pending(results, "kv_cache"),
        "decode": decode_block(results, link),
        "sharded": sharded_block(results, link),
        "lr-sweep": sweep_block(sweep, link) if sweep else pending(results, "lr_sweep"),
        "ablations": ablations_block(sweep) if sweep else pending(results, "lr_sweep"),
        "samples": samples_block(training) if training else pending(results, "training"),
    }


def with_note(text: str, note: str | None) -> str:
    return text if note is None else f"{text}\n\n{note}"


def render_markdown(text: str, filled: dict[str, str], source: str = "README") -> str:
    """``text`` with each marked block replaced; an unknown block name is an error."""
    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in filled:
            raise ValueError(f"{source}: unknown results block {name!r}; the report makes "
                             f"{', '.join(filled)}")
        return f"<!-- results:{name} -->\n{filled[name]}\n<!-- /results:{name} -->"

    return MARKER.sub(replace, text)


# ---- figures ----------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcdefaults()
    plt.rcParams.update({"font.family": "DejaVu Sans", "font.size": 9, "figure.dpi": 100,
                         "savefig.dpi": 100, "axes.grid": True, "grid.alpha": 0.3,
                         "svg.hashsalt": "memeff", "path.simplify": False})
    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None}, bbox_inches=None)
    return buffer.getvalue()


def _ratio_axis(ax, axis: str = "x") -> None:
    """A log axis labelled "0.5x", "1x", "2x" rather than in powers of ten."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    target = ax.xaxis if axis == "x" else ax.yaxis
    lo, hi = (ax.get_xlim() if axis == "x" else ax.get_ylim())
    ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if lo <= t <= hi]
    target.set_major_locator(FixedLocator(ticks))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    target.set_minor_formatter(NullFormatter())


def step_time_figure(plt, step: dict):
    """One panel per model: each optimizer's step time over fused AdamW's (a peer not timed
    on a model in this profile is said to be), a tick where refreshes amortize to."""
    summary = step["summary"]
    models = sorted(summary)
    names = [n for n in REGISTRY if n != BASELINE and any(n in summary[m] for m in models)]
    shapes = {key: r.get("timed_shapes") or key[0] for key, r in step_rows(step).items()}
    fig, axes = plt.subplots(1, len(models), figsize=(10, 1.4 + 0.42 * len(names)),
                             sharey=True, squeeze=False)
    y = list(range(len(names)))
    for ax, model in zip(axes[0], models):
        timed = [(yi, n, summary[model][n]) for yi, n in zip(y, names) if n in summary[model]]
        ratios = [e["ratio_to_adamw"] for _, _, e in timed]
        amortized = [e["amortized_ratio_to_adamw"] for _, _, e in timed
                     if e.get("refresh_ratio_to_adamw") is not None]
        ax.barh([yi for yi, _, _ in timed], [r - 1 for r in ratios], left=1.0, height=0.6,
                color=["tab:green" if r < 1 else "tab:red" for r in ratios])
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_xscale("log")
        lo, hi = min(ratios + amortized + [1.0]), max(ratios + amortized + [1.0])
        ax.set_xlim(lo / 1.8, hi * 3.0)
        for (yi, n, e), r in zip(timed, ratios):
            text = f"{r:.2f}x" + ("†" if shapes.get((model, n), model) != model else "")
            end = r
            if e.get("refresh_ratio_to_adamw") is not None:
                end = max(r, e["amortized_ratio_to_adamw"]) if r >= 1 else r
                ax.plot([e["amortized_ratio_to_adamw"]], [yi], marker="|", markersize=12,
                        color="black", linestyle="none")
                text += f" ({e['amortized_ratio_to_adamw']:.2f}x)"
            ax.text(end * 1.08 if r >= 1 else end / 1.08, yi, text, va="center",
                    ha="left" if r >= 1 else "right", fontsize=7)
        for yi, n in zip(y, names):
            if n not in summary[model]:
                ax.text(1.05, yi, "not timed in this profile", va="center", ha="left",
                        fontsize=7, color="gray")
        _ratio_axis(ax)
        ax.set_yticks(y, labels=[label(n) for n in names])
        for tick, n in zip(ax.get_yticklabels(), names):
            tick.set_fontstyle("italic" if n in PEER_NAMES else "normal")
        ax.grid(axis="y", visible=False)
        ax.set(title=model, xlabel=f"step time / {label(BASELINE)} (log scale)")
    axes[0][0].set_ylim(len(names) - 0.5, -0.5)  # the first name on top
    fig.suptitle(f"Optimizer step time against {label(BASELINE)}, same run: green faster, "
                 "red slower; peers in italics\n| and (x): a projector's refresh spread over "
                 "its interval; †: timed on fewer blocks of the model's shapes")
    fig.tight_layout()
    return fig


def _family_panels(training: dict) -> list[tuple[str, list[str]]]:
    """(title, runs) per panel: each optimizer family but the baseline's, then the
    attention layouts of the baseline optimizer."""
    first = first_rows(training)
    runs = headline_labels(training)
    mha = [r for r in runs if first[r]["n_kv_head"] == first[r]["n_head"]]
    families = list(dict.fromkeys(spec(n).family for n in OPTIMIZER_NAMES))
    panels = []
    for family in families:
        members = [r for r in mha if spec(first[r]["optimizer"]).family == family
                   and first[r]["optimizer"] != BASELINE]
        if members:
            panels.append((f"{family} optimizers", members))
    layouts = [r for r in runs if first[r]["optimizer"] == BASELINE and r not in mha]
    if layouts:
        panels.append((f"attention layouts ({label(BASELINE)})", layouts))
    return panels


def _curves(training: dict, run: str, key: str, start: int):
    """Iterations from ``start`` and, per iteration, the values over seeds."""
    runs = [r for r in training["rows"] if r["label"] == run]
    iters = [e["iter"] for e in runs[0]["evals"] if e["iter"] >= start]
    values = [[next(e[key] for e in r["evals"] if e["iter"] == it) for r in runs] for it in iters]
    return iters, values, runs


def loss_curves_figure(plt, training: dict):
    """Top: val loss over the second half of training, zoomed; bottom: each run's val loss
    minus the baseline's at the same seed (the same eval batches), where gaps of 0.01 show."""
    first, base = first_rows(training), training["config"]["base"]
    reference = tuned_run(training, BASELINE)
    panels = _family_panels(training)
    if reference is None or not panels:
        return None  # nothing to compare with
    start = training["config"]["max_iters"] // 2
    fig, axes = plt.subplots(2, len(panels), figsize=(11, 6.4), sharex=True, sharey="row",
                             squeeze=False)
    ref_iters, ref_values, ref_runs = _curves(training, reference, "val_loss", start)
    ref_by_seed = {r["seed"]: {e["iter"]: e["val_loss"] for e in r["evals"]} for r in ref_runs}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, (title, runs) in enumerate(panels):
        top, bottom = axes[0][col], axes[1][col]
        top.plot(ref_iters, [sum(v) / len(v) for v in ref_values], color="black", linestyle="--",
                 marker="o", markersize=3, label=run_label(first[reference], base))
        bottom.axhline(0.0, color="black", linestyle="--", linewidth=1)
        for i, run in enumerate(runs):
            color = colors[i % len(colors)]
            iters, values, seeds = _curves(training, run, "val_loss", start)
            top.plot(iters, [sum(v) / len(v) for v in values], color=color, marker="o",
                     markersize=3, label=run_label(first[run], base))
            top.fill_between(iters, [min(v) for v in values], [max(v) for v in values],
                             color=color, alpha=0.15, linewidth=0)
            gaps = [[v - ref_by_seed[r["seed"]][it] for v, r in zip(vals, seeds)
                     if r["seed"] in ref_by_seed] for it, vals in zip(iters, values)]
            bottom.plot(iters, [sum(g) / len(g) for g in gaps], color=color, marker="o", markersize=3)
            bottom.fill_between(iters, [min(g) for g in gaps], [max(g) for g in gaps],
                                color=color, alpha=0.15, linewidth=0)
        top.set_title(title)
        top.legend(fontsize=7)
        bottom.set_xlabel("iteration")
    axes[0][0].set_ylabel(f"val loss ({estimate(training)})\nmean over seeds, band min to max")
    axes[1][0].set_ylabel(f"minus {label(BASELINE)} at the same seed\nmean, band min to max")
    fig.suptitle(f"Baby GPT on Tiny Shakespeare (characters): the second half of "
                 f"{training['config']['max_iters']} iterations, each optimizer at its tuned lr")
    fig.tight_layout()
    return fig


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (x, y) no other point beats on both, smaller being better: none
    has x and y both at most theirs and one of them less. In order of x."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(ox <= x and oy <= y and (ox, oy) != (x, y) for ox, oy in points)]
    return sorted(front, key=lambda i: points[i])


def distinct_colors(plt, n: int) -> Callable[[int], Any]:
    """A colormap giving each of ``n`` lines or points a color of its own."""
    return plt.get_cmap("tab10" if n <= 10 else "tab20")


LABEL_RISE = 4  # points: a label sits this far above and 6 right of its point, if it fits


def label_offsets(ax, labels: list[tuple[float, float, str]], fontsize: float
                  ) -> list[tuple[float, float]]:
    """An offset (in points) for each (x, y, text) label, so that no two overlap: each
    takes the first of rising then alternately lower and higher rows, one text line apart,
    whose box (its width estimated from its length, with a margin) is clear of the points
    and of the labels placed before."""
    to_points = 72 / ax.figure.dpi
    at = [tuple(v * to_points for v in ax.transData.transform((x, y))) for x, y, _ in labels]
    marker = 5  # points, each side of a point's center
    placed = [(px - marker, py - marker, px + marker, py + marker) for px, py in at]
    line, offsets = 1.3 * fontsize, [None] * len(labels)
    order = sorted(range(len(labels)), key=lambda i: -labels[i][1])  # top to bottom
    for i in order:
        (px, py), text = at[i], labels[i][2]
        width = 0.65 * fontsize * len(text) + 4
        for k in range(40):
            dy = LABEL_RISE + line * ((k + 1) // 2) * (-1 if k % 2 else 1)
            box = (px + 6, py + dy, px + 6 + width, py + dy + line)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
                       for b in placed):
                break
        placed.append(box)
        offsets[i] = (6, dy)
    return offsets


def loss_vs_state_figure(plt, training: dict, peers: dict | None = None):
    """Whole-split val loss against optimizer-state bytes, ours and the peers' (where their
    runs are comparable), with the Pareto frontier: the points no other beats on both."""
    base = training["config"]["base"]
    documents = [training] + ([peers] if peers is not None
                              and not_comparable(training, peers) is None else [])
    points = []  # (state MiB, mean loss, loss stats, name, peer)
    for document in documents:
        summary, first = document["summary"], first_rows(document)
        for run in headline_labels(document):
            if first[run]["n_kv_head"] != first[run]["n_head"]:
                continue  # GQA and MQA change the KV cache, not the optimizer state
            loss = whole_split(summary[run])
            points.append((summary[run]["optimizer_state_bytes"] / 2**20, loss["mean"], loss,
                           run_label(first[run], base), first[run]["optimizer"] in PEER_NAMES))
    fig, ax = plt.subplots(figsize=(9, 5.4))
    front = pareto_front([(x, y) for x, y, *_ in points])
    if len(front) > 1:
        xs = [points[i][0] for i in front]
        ys = [points[i][1] for i in front]
        ax.step(xs, ys, where="post", color="gray", linewidth=2, alpha=0.5, zorder=1,
                label="Pareto frontier: no other point has less state and lower loss")
    colors = distinct_colors(plt, len(points))
    for i, (x, y, loss, name, peer) in enumerate(points):
        ax.errorbar([x], [y], yerr=[[y - loss["min"]], [loss["max"] - y]],
                    marker="s" if peer else "o", capsize=3, linestyle="none", color=colors(i),
                    zorder=2)
    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, hi * 3)  # room for the point labels
    ax.plot([], [], marker="o", linestyle="none", color="gray", label="ours and torch's")
    if len(documents) > 1:
        ax.plot([], [], marker="s", linestyle="none", color="gray",
                label="peers (other packages), in italics")
    ax.set(xlabel="optimizer state, whole model (MiB, measured; log scale)",
           ylabel="final val loss, whole split\n(mean; bars: min to max over seeds)",
           title=f"Optimizer memory against final loss, baby GPT, "
                 f"{training['config']['max_iters']} iterations (bold: on the frontier)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    fig.tight_layout()  # before the labels are placed: it moves the axes
    offsets = label_offsets(ax, [(x, y, name) for x, y, _, name, _ in points], fontsize=7)
    for i, ((x, y, _, name, peer), offset) in enumerate(zip(points, offsets)):
        ax.annotate(name, (x, y), xytext=offset, textcoords="offset points", fontsize=7,
                    fontstyle="italic" if peer else "normal",
                    fontweight="bold" if i in front else "normal",
                    arrowprops=dict(arrowstyle="-", color=colors(i), linewidth=0.6,
                                    shrinkA=0, shrinkB=3) if offset[1] != LABEL_RISE else None)
    return fig


LR_SWEEP_COLUMNS = 5  # panels per row of the lr-sweep figure


def lr_sweep_figure(plt, sweep: dict):
    rows = [r for r in sweep["rows"] if not r.get("variant")]
    diverged = [r for r in rows if r.get("diverged")]
    rows = [r for r in rows if not r.get("diverged")]
    names = [n for n in REGISTRY if any(r["optimizer"] == n for r in rows)]
    ncols = min(LR_SWEEP_COLUMNS, len(names))  # the peers' panels wrap onto more rows
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 0.4 + 3.0 * nrows),
                             squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    best = sweep["summary"]["best"]
    styles = ("-", "--", ":", "-.")
    for ax, name in zip(axes.flat, names):
        decays = sorted({r["weight_decay"] for r in rows if r["optimizer"] == name})
        for i, wd in enumerate(decays):
            pts = sorted((r["learning_rate"], r["final_val_loss"]) for r in rows
                         if r["optimizer"] == name and r["weight_decay"] == wd)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[i % len(styles)], marker="o",
                    markersize=3, color=f"C{i}", label=f"weight decay {wd:g}")
        lost = sorted({r["learning_rate"] for r in diverged if r["optimizer"] == name})
        if lost:  # at the top edge: there is no loss to draw
            ax.plot(lost, [1.0] * len(lost), marker="x", color="red", linestyle="none",
                    transform=ax.get_xaxis_transform(), clip_on=False, label="diverged")
        if name in best:
            b = best[name]
            ax.plot([b["learning_rate"]], [b["final_val_loss"]], marker="*", markersize=12,
                    color="black", linestyle="none", label=f"best: lr {b['learning_rate']:g}")
        ax.set_xscale("log")
        ax.set_title(label(name), fontstyle="italic" if name in PEER_NAMES else "normal")
        ax.set_xlabel("peak learning rate (log scale)")
        ax.legend(fontsize=6)
    for row in axes:
        row[0].set_ylabel(f"final val loss ({estimate(sweep)}),\none seed")
    fig.suptitle(f"Learning-rate sweep, baby GPT, {sweep['config']['max_iters']} iterations"
                 + (" (peers' panels titled in italics)" if set(names) & set(PEER_NAMES) else ""))
    fig.tight_layout()
    return fig


def state_ratio_figure(plt, state: dict):
    rows = [r for r in float32_rows(state) if "subset_size" not in r and r["optimizer"] != BASELINE]
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in rows))
    names = [n for n in REGISTRY if any(r["optimizer"] == n for r in rows)]
    markers = ("o", "s", "^", "D", "v", "P")
    width = min(0.12, 0.8 / max(len(names), 1))  # each shape's points stay within its slot
    fig, ax = plt.subplots(figsize=(10, 3.8))
    for i, name in enumerate(names):
        ratios = {tuple(r["shape"]): r["ratio_to_adamw"] for r in rows if r["optimizer"] == name}
        xs = [x + (i - (len(names) - 1) / 2) * width for x, s in enumerate(shapes) if s in ratios]
        ax.plot(xs, [ratios[s] for s in shapes if s in ratios], marker=markers[i % len(markers)],
                linestyle="none", markersize=6, color=f"C{i % 10}",
                fillstyle="none" if name in PEER_NAMES else "full",
                label=label(name) + (" (peer)" if name in PEER_NAMES else ""))
    ax.set_xlim(-0.5, len(shapes) - 0.5)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g}%"))
    ax.set_xticks(range(len(shapes)), labels=["x".join(map(str, s)) for s in shapes])
    ax.set(ylabel=f"state bytes, % of {label(BASELINE)} (log scale)", xlabel="parameter shape",
           title=f"Optimizer-state bytes as a share of {label(BASELINE)} (black line), measured")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def decode_time_figure(plt, kv: dict):
    """Per dtype: each path's decode time per layer over its MHA time, against n_kv_head,
    beside the cache bytes' ratio (where a bandwidth-bound step would sit)."""
    n_head = decode_n_head(kv)
    entries = [e for e in kv["summary"]["decode_ratio_to_mha"] if e["n_head"] == n_head]
    dtypes = sorted({e["dtype"] for e in entries}, reverse=True)
    fig, axes = plt.subplots(1, len(dtypes), figsize=(10, 3.8), sharey=True, squeeze=False)
    styles = {"folded": "-", "sdpa_gqa": "--"}
    for ax, dtype in zip(axes[0], dtypes):
        mine = [e for e in entries if e["dtype"] == dtype]
        kvs = sorted({e["n_kv_head"] for e in mine})
        ax.plot(kvs, [next(e["bytes_ratio_to_mha"] for e in mine if e["n_kv_head"] == k) for k in kvs],
                color="black", linewidth=3, alpha=0.25, label="cache bytes / MHA's")
        for i, seq_len in enumerate(sorted({e["seq_len"] for e in mine})):
            for attention in sorted({e["attention"] for e in mine}):
                pts = sorted((e["n_kv_head"], e["time_ratio_to_mha"]) for e in mine
                             if e["seq_len"] == seq_len and e["attention"] == attention)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(attention, ":"),
                        color=f"C{i}", marker="o", markersize=3,
                        label=f"{attention}, context {seq_len}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(kvs, labels=[str(k) for k in kvs])
        ax.set_xticks([], minor=True)
        ax.set(title=dtype.removeprefix("torch."), xlabel=f"K/V heads (of {n_head} query heads)")
        _ratio_axis(ax, "y")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("decode time per layer / MHA's (log)")
    fig.suptitle("One decode step over a cache larger than the last-level cache: time against bytes")
    fig.tight_layout()
    return fig


def sharded_state_figure(plt, sharded: dict):
    """Per-rank state (the largest rank's) against world size, each optimizer's state at
    N = 1 divided by N dotted beside it."""
    rows = [r for r in sharded["rows"] if r["works"]]
    if not rows:
        return None
    fails = {r["optimizer"] for r in sharded["rows"] if not r["works"]}
    fig, ax = plt.subplots(figsize=(10, 4.2))
    names = [n for n in REGISTRY if any(r["optimizer"] == n for r in rows)]
    colors = distinct_colors(plt, len(names))
    for i, name in enumerate(names):  # peers: squares, dashed
        peer = name in PEER_NAMES
        color = colors(i)
        points = sorted((r["world_size"], max(r["state_bytes_per_rank"]) / 2**20)
                        for r in rows if r["optimizer"] == name)
        ax.plot(*zip(*points), marker="s" if peer else "o", linestyle="--" if peer else "-",
                color=color, label=label(name) + (" (peer)" if peer else "")
                + (": fails under FSDP2" if name in fails else ""))
        if points[0][0] == 1:
            ax.plot([n for n, _ in points], [points[0][1] / n for n, _ in points], ":",
                    color=color, linewidth=1)
    sizes = sorted({r["world_size"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, labels=[str(n) for n in sizes])
    ax.set_xticks([], minor=True)
    ax.set(xlabel="processes (world size)", ylabel="optimizer state per rank, MiB (log scale)",
           title=f"FSDP2, {rows[0]['model']}: state per rank "
                 "(dotted: state at N = 1, divided by N)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


FIGURES = {  # file name -> (suite it needs, builder, what it shows)
    "loss_vs_state.png": ("training", loss_vs_state_figure,
                          "Final validation loss against optimizer-state bytes"),
    "loss_curves.png": ("training", loss_curves_figure,
                        "Validation loss over the second half of training, and its gap to AdamW"),
    "step_time_ratio.png": ("step_time", step_time_figure,
                            "Optimizer step time relative to torch's fused AdamW"),
    "decode_time.png": ("kv_cache", decode_time_figure,
                        "Decode time per layer against K/V heads, relative to MHA"),
    "optimizer_state_ratio.png": ("optimizer_state", state_ratio_figure,
                                  "Optimizer-state bytes relative to AdamW"),
    "lr_sweep.png": ("lr_sweep", lr_sweep_figure,
                     "Final validation loss against peak learning rate, one panel per optimizer"),
    "sharded_state.png": ("sharded", sharded_state_figure,
                          "Optimizer state per rank under FSDP2 against world size"),
}


FIGURE_EXTRAS = {  # file name -> other suites its builder takes too (None when not published)
    "loss_vs_state.png": ("training_peers",),
}


def figures(results: dict[str, dict]) -> dict[str, bytes]:
    """PNG bytes per file name, for every figure whose suite is published with current rows
    (a builder returns None when its suite's rows hold nothing to draw)."""
    plt = _pyplot()
    out = {}
    for name, (suite, build, _) in FIGURES.items():
        document = current(results, suite)
        if document is not None:
            extras = (current(results, s) for s in FIGURE_EXTRAS.get(name, ()))
            fig = build(plt, document, *extras)
            if fig is None:
                continue
            try:
                out[name] = _png(fig)
            finally:
                plt.close(fig)
    return out


def matplotlib_version() -> str:
    import matplotlib

    return matplotlib.__version__


# ---- rendering and writing --------------------------------------------------------------

def render(results: dict[str, dict], results_dir: Path, readme: Path, results_readme: Path,
           plots_dir: Path, figure_version: str | None = None) -> tuple[dict[Path, bytes], list[Path]]:
    """Everything the report writes, in memory: (path -> bytes, figure files to remove)."""
    outputs: dict[Path, bytes] = {}
    version = figure_version or matplotlib_version()
    for path in (readme, results_readme):
        def relative(target: Path, path=path) -> str:
            return Path(os.path.relpath(target, path.parent)).as_posix()

        filled = blocks(results, lambda name: relative(plots_dir / name),
                        lambda suite: relative(results_dir / f"{suite}.json"), version)
        text = path.read_text(encoding="utf-8")
        outputs[path] = render_markdown(text, filled, str(path)).encode("utf-8")
    made = figures(results)
    outputs.update({plots_dir / name: png for name, png in made.items()})
    stale = [plots_dir / name for name in FIGURES if name not in made]
    return outputs, stale


def publish(outputs: dict[Path, bytes], stale: Iterable[Path]) -> None:
    """Write every file to a temporary file beside it, then move them all into place and
    remove ``stale``: a failure before the moves leaves every target as it was."""
    temporaries: list[tuple[str, Path]] = []
    try:
        for path, data in outputs.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                mode = stat.S_IMODE(path.stat().st_mode)
            except FileNotFoundError:
                umask = os.umask(0)
                os.umask(umask)
                mode = 0o666 & ~umask
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temporaries.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fchmod(f.fileno(), mode)
                os.fsync(f.fileno())
    except BaseException:
        for tmp, _ in temporaries:
            Path(tmp).unlink(missing_ok=True)
        raise
    for tmp, path in temporaries:
        os.replace(tmp, path)
    for path in stale:
        path.unlink(missing_ok=True)


# ---- --compare --------------------------------------------------------------------------

def _compare_line(what: str, yours: float, published: float, low: float | None = None,
                  high: float | None = None, fmt: str = ".4f") -> list[str]:
    if low is None:
        verdict = "no published spread"
    else:
        verdict = "inside" if low <= yours <= high else "outside"
    spread = "" if low is None else f"{low:{fmt}} to {high:{fmt}}"
    return [what, f"{yours:{fmt}}", f"{published:{fmt}}", spread, verdict]


def compare_training(yours: dict, published: dict) -> list[list[str]]:
    if yours["config"]["max_iters"] != published["config"]["max_iters"]:
        return [["(all runs)", "", "", "", f"not comparable: {yours['config']['max_iters']} "
                 f"iterations against {published['config']['max_iters']}"]]
    lines = []
    for run, stats in yours["summary"].items():
        theirs = published["summary"].get(run)
        if theirs is None:
            continue
        if yours["config"]["runs"][run]["hparams"] != published["config"]["runs"][run]["hparams"]:
            lines.append([run, "", "", "", "not comparable: other settings"])
            continue
        key = ("final_val_loss_whole_split" if "final_val_loss_whole_split" in stats
               and "final_val_loss_whole_split" in theirs else "final_val_loss")
        p = theirs[key]
        lines.append(_compare_line(f"{run}: {key}", stats[key]["mean"], p["mean"],
                                   p["min"] if p["n"] > 1 else None, p["max"]))
    return lines


def compare_step_time(yours: dict, published: dict) -> list[list[str]]:
    lines = []
    for model, entries in yours["summary"].items():
        for name, e in entries.items():
            p = published["summary"].get(model, {}).get(name)
            if p is not None:
                lines.append(_compare_line(f"{model}: {label(name)}, / {label(BASELINE)}",
                                           e["ratio_to_adamw"], p["ratio_to_adamw"], fmt=".2f"))
    return lines


def compare_kv_cache(yours: dict, published: dict, decode: bool) -> list[list[str]]:
    lines = []
    shapes = {r["model"]: r for r in published["rows"] if r["test"].startswith("test_model_shape")}
    for r in yours["rows"]:
        if r["test"].startswith("test_model_shape") and r["model"] in shapes:
            lines.append(_compare_line(f"{r['model']}: bytes/token", r["bytes_per_token"],
                                       shapes[r["model"]]["bytes_per_token"], fmt=",.0f")[:4]
                         + ["equal" if r["bytes_per_token"] == shapes[r["model"]]["bytes_per_token"]
                            else "differs"])
    if not decode:
        lines.append(["decode", "", "", "", "published file has older rows: " + run_command("kv_cache")])
    else:
        key = ("dtype", "n_head", "seq_len", "n_kv_head", "attention")
        theirs = {tuple(e[k] for k in key): e for e in published["summary"]["decode_ratio_to_mha"]}
        for e in yours["summary"].get("decode_ratio_to_mha", []):
            p = theirs.get(tuple(e[k] for k in key))
            if p is not None and e["n_kv_head"] != e["n_head"]:
                lines.append(_compare_line(
                    f"decode {e['dtype'].removeprefix('torch.')} T{e['seq_len']} "
                    f"{e['n_kv_head']}/{e['n_head']} {e['attention']}: time / MHA's",
                    e["time_ratio_to_mha"], p["time_ratio_to_mha"], fmt=".2f"))
    return lines


def compare_state(yours: dict, published: dict) -> list[list[str]]:
    theirs = {(tuple(r["shape"]), r["optimizer"], r.get("dtype"), str(r.get("subset_size"))): r
              for r in published["rows"]}
    lines = []
    for r in yours["rows"]:
        p = theirs.get((tuple(r["shape"]), r["optimizer"], r.get("dtype"), str(r.get("subset_size"))))
        if p is not None:
            what = f"{'x'.join(map(str, r['shape']))} {label(r['optimizer'])}"
            if "subset_size" in r:
                what += f" subset {r['subset_size']}"
            lines.append(_compare_line(what + ": / AdamW", r["ratio_to_adamw"], p["ratio_to_adamw"])[:4]
                         + ["equal" if r["live_bytes"] == p["live_bytes"] else "differs"])
    return lines


def compare(directory: Path, published_dir: Path) -> str:
    """The user's quick/default results beside the published ones, as text."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--compare directory {directory} does not exist")
    published = load_results(published_dir)
    same_dir = directory.resolve() == Path(published_dir).resolve()
    out = []
    found = 0
    for suite in SUITES:
        names = [f"{suite}.{p}.json" for p in COMPARED_PROFILES] + ([] if same_dir else [f"{suite}.json"])
        for name in names:
            path = directory / name
            if not path.is_file():
                continue
            found += 1
            yours = read_checked(path)
            header = f"{suite}: {path} (profile {yours['profile']}) against the published " \
                     f"{Path(published_dir) / (suite + '.json')}"
            if suite not in published:
                out += [header, f"  nothing published for {suite} to compare with", ""]
                continue
            theirs = published[suite]
            if not is_current(yours):
                out += [header, f"  {path} has older rows; rerun the suite", ""]
                continue
            if suite in TRAINING_SUITES:
                lines = compare_training(yours, theirs)
            elif suite == "step_time":
                lines = (compare_step_time(yours, theirs) if is_current(theirs) else
                         [["(all)", "", "", "", "published file has older rows: "
                           + run_command(suite)]])
            elif suite == "kv_cache":
                lines = compare_kv_cache(yours, theirs, is_current(theirs))
            elif suite == "optimizer_state":
                lines = compare_state(yours, theirs)
            else:
                lines = []
            out.append(header)
            out += _text_table(["", "yours", "published", "published spread", ""], lines)
            out.append("")
    if not found:
        raise FileNotFoundError(
            f"{directory} holds no results to compare: expected <suite>.default.json or "
            f"<suite>.quick.json (python -m pytest bench --benchmark-only writes them)")
    return "\n".join(out).rstrip() + "\n"


def _text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return ["  no rows in common"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
            for row in [header, *rows]]


# ---- command line -----------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m bench.report",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=REPO / "results" / "cpu",
                        help="published results to report (default: results/cpu)")
    parser.add_argument("--plots-dir", type=Path, default=REPO / "plots",
                        help="where the figures go (default: plots)")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md",
                        help="the README with the headline blocks (default: README.md)")
    parser.add_argument("--results-readme", type=Path, default=REPO / "results" / "README.md",
                        help="the README with every table (default: results/README.md)")
    parser.add_argument("--compare", type=Path, metavar="DIR",
                        help="print the quick/default results in DIR beside the published "
                             "ones and write nothing")
    args = parser.parse_args(argv)
    if args.compare is not None:
        sys.stdout.write(compare(args.compare, args.results_dir))
        return 0
    results = load_results(args.results_dir)  # raises before anything is written
    for path in (args.readme, args.results_readme):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: the report fills its marked blocks")
    for option, path, directory in (
            ("--plots-dir", args.plots_dir, args.plots_dir),
            ("--readme", args.readme, args.readme.parent),
            ("--results-readme", args.results_readme, args.results_readme.parent)):
        check_writable_dir(directory, f"{option} {path}")  # before the figures take their time
    outputs, stale = render(results, args.results_dir, args.readme, args.results_readme,
                            args.plots_dir)
    removed = [p for p in stale if p.exists()]
    publish(outputs, removed)
    for path in outputs:
        print(f"wrote {path}")
    for path in removed:
        print(f"removed {path}: its suite is not published with its current rows")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
