"""`mpckv report --bench` renders `mpckv bench fusion` JSON (one table per model and length)."""

from __future__ import annotations

import json

from mpckv.evals.report_fusion import fusion_section, is_fusion_bench


def _rec(method: str, ttft: float, speedup: float) -> dict:
    return {
        "model": "tiny-x",
        "length_bytes": 1024,
        "tokens": 1000.0,
        "method": method,
        "ttft_s": ttft,
        "ttft_speedup": speedup,
        "recompute_ratio": 0.15,
        "compute_fraction": 0.2,
        "hit_rate": 1.0,
        "accuracy": 0.5,
        "accuracy_delta": -0.25,
    }


def test_fusion_section_lists_every_method(tmp_path):
    obj = {"config": {"suite": "docqa", "chunks": 8, "n": 4, "recompute": 0.15}, "records": []}
    obj["records"] = [_rec("full", 2.0, 1.0), _rec("cacheblend", 0.5, 4.0)]
    path = tmp_path / "f.json"
    path.write_text(json.dumps(obj))
    assert is_fusion_bench(obj)
    assert not is_fusion_bench({"kind": "bench-plaintext", "records": [{"method": "dense"}]})
    text = fusion_section(obj, path)
    assert "| `cacheblend` | 0.500 | 4.00 | 0.150 | 0.200 | 1.00 | 0.50 | -0.25 |" in text
    assert "**tiny-x**, 1024 bytes" in text and "`full`" in text
