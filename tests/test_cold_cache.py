"""benchmarks/cold_cache.py at a tiny scale (--gb 0.01): it builds the repeated tree and its .beton, evicts their
pages before each epoch (each timed epoch then reads about the whole file from storage) and writes its table.
The scale measurement itself (several GB) is run by hand, not here."""

from __future__ import annotations

import json

from benchmarks import cold_cache
from tests.loader_helpers import require

require("ffcv")


def test_cold_cache_smoke(real_data_root, tmp_path):
    work = tmp_path / "cold"
    assert cold_cache.main(["--src", str(real_data_root / "hymenoptera_data.tar"), "--work", str(work), "--gb", "0.01",
                            "--side", "64", "--batch-size", "16", "--workers", "2", "--epochs", "1", "--runs",
                            "page_aware-off", "imagefolder"]) == 0
    rows = json.loads((work / "cold_cache.json").read_text())["rows"]
    assert [r["loader"] for r in rows] == [cold_cache.NAMES["page_aware-off"], cold_cache.NAMES["imagefolder"]]
    for r in rows:
        assert r["images_per_s"] > 0 and 0.8 < r["read_over_stored"] < 1.5  # cold: each byte read about once
    assert "| ffcv page_aware, os_cache off |" in (work / "cold_cache.md").read_text()
