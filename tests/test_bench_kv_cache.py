"""The decode benchmark's sizing: last-level cache detection, model depth, summary."""

import pytest
import torch

from bench.hardware import FALLBACK_LLC_BYTES, last_level_cache, parse_size, sysfs_llc_bytes
from bench.test_kv_cache import MAX_CACHE_BYTES, MAX_LAYERS, MIN_LAYERS, decode_depth, summarize


def fake_cache(root, cpu, index, level, kind, size, shared):
    path = root / f"cpu{cpu}" / "cache" / f"index{index}"
    path.mkdir(parents=True)
    for name, text in dict(level=str(level), type=kind, size=size, shared_cpu_list=shared).items():
        (path / name).write_text(text + "\n")


@pytest.mark.parametrize("text, expected", [("32768K", 32 * 2**20), ("1M", 2**20),
                                            ("512", 512), ("2G", 2**31)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_sysfs_llc_adds_distinct_last_level_caches(tmp_path):
    # two core complexes of two CPUs, each with its own 32 MiB L3; private L2s
    for cpu in range(4):
        fake_cache(tmp_path, cpu, 0, 1, "Instruction", "32K", str(cpu))
        fake_cache(tmp_path, cpu, 1, 2, "Unified", "1024K", str(cpu))
        fake_cache(tmp_path, cpu, 2, 3, "Unified", "32768K", "0-1" if cpu < 2 else "2-3")
    assert sysfs_llc_bytes({0, 1, 2, 3}, tmp_path) == 64 * 2**20
    assert sysfs_llc_bytes({0, 1}, tmp_path) == 32 * 2**20


def test_sysfs_llc_takes_the_highest_level_present(tmp_path):
    fake_cache(tmp_path, 0, 0, 1, "Data", "48K", "0")
    fake_cache(tmp_path, 0, 1, 2, "Unified", "2048K", "0")
    assert sysfs_llc_bytes({0}, tmp_path) == 2 * 2**20
    assert sysfs_llc_bytes({0}, tmp_path / "missing") is None


def test_last_level_cache_on_this_cpu():
    size, source = last_level_cache(torch.device("cpu"))
    assert size > 0 and source in ("sysfs", "sysconf", "fallback")
    assert source != "fallback" or size == FALLBACK_LLC_BYTES


@pytest.mark.parametrize("layer_bytes, llc_bytes, expected", [
    (2**20, 32 * 2**20, 128),  # 4 LLCs of 1 MiB layers
    (2**20, 64 * 2**20, MAX_LAYERS),  # 256 wanted
    (128 * 2**20, 32 * 2**20, MIN_LAYERS),  # one layer is already 4 LLCs
    (512 * 2**20, 2**30, MAX_CACHE_BYTES // (512 * 2**20)),
    (4 * 2**30, 2**20, 1),  # a layer beyond the cap still runs alone
])
def test_decode_depth(layer_bytes, llc_bytes, expected):
    assert decode_depth(layer_bytes, llc_bytes) == expected


def decode_row(n_kv_head, attention, time_per_layer_s):
    return {"test": f"test_decode[H4-kv{n_kv_head}-{attention}]", "median_s": time_per_layer_s * 8,
            "attention": attention, "dtype": "torch.float32", "n_head": 4, "seq_len": 64,
            "n_kv_head": n_kv_head, "layer_bytes": 1000 * n_kv_head,
            "time_per_layer_s": time_per_layer_s}


def test_summary_ratios_and_faster_path():
    rows = [decode_row(4, "folded", 4.0), decode_row(4, "sdpa_gqa", 4.4),
            decode_row(1, "folded", 2.0), decode_row(1, "sdpa_gqa", 1.1)]
    summary = summarize(rows)
    ratios = {(r["n_kv_head"], r["attention"]): r for r in summary["decode_ratio_to_mha"]}
    assert ratios[(1, "folded")]["time_ratio_to_mha"] == pytest.approx(0.5)
    assert ratios[(1, "sdpa_gqa")]["time_ratio_to_mha"] == pytest.approx(0.25)
    assert ratios[(1, "sdpa_gqa")]["bytes_ratio_to_mha"] == pytest.approx(0.25)
    faster = {r["n_kv_head"]: r for r in summary["decode_faster_attention"]}
    assert faster[4]["faster"] == "folded" and faster[1]["faster"] == "sdpa_gqa"
    assert faster[1]["sdpa_gqa_over_folded"] == pytest.approx(0.55)
    assert summary["decode_faster_attention_by_dtype"] == {
        "torch.float32": {"folded": 0, "sdpa_gqa": 1}}
