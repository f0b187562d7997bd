"""The per-epoch metrics reach TensorBoard and an offline W&B run, read back here from the files they leave
(no network): every numeric metrics.csv column at every epoch, and for W&B the resolved recipe."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from beton_trainer.common.schema import to_dict
from beton_trainer.trainer.config import load_recipe
from tests.train_helpers import metrics, run_train

BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of checksummed record fragments
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file (the format `wandb sync` uploads): a 7-byte header (":W&B",
    magic 0xBEE1, version 0), then fragments each with a header of crc32(type + data), length and type."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0)
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"bad checksum at byte {pos}"
        pos += 7 + length
        pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def numeric_columns(row: dict) -> dict[str, float]:
    """A metrics.csv row's logged numbers (what MetricsLog sends to TensorBoard and W&B)."""
    found = {}
    for key, value in row.items():
        if key == "epoch" or value in ("", None):
            continue
        try:
            found[key] = float(value)
        except ValueError:  # the phase name
            continue
    return found


ARGS = ["--recipe", "c10_cnn_smoke", "--cpu", "--set", "phases.0.epochs=3"]


def test_offline_wandb_run_holds_the_resolved_recipe_and_every_epoch(tiny_rgb_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    run_train([*ARGS, "--data", str(tiny_rgb_data), "--run-dir", str(run_dir), "--set", "wandb=true",
               "--set", "tensorboard=false"])
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(log)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update if item.key != "_wandb"}
    resolved = load_recipe(str(run_dir / "config.toml"))
    assert config == json.loads(json.dumps(to_dict(resolved)))
    assert run.display_name == "run"
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.nested_key[0] if item.nested_key else item.key: json.loads(item.value_json)
                     for item in record.history.item}
            history[items.pop("_step")] = {k: v for k, v in items.items() if not k.startswith("_")}
    rows = metrics(run_dir)
    assert len(rows) == 3
    assert history == {int(row["epoch"]): numeric_columns(row) for row in rows}


def test_tensorboard_events_hold_every_epoch_metric(tiny_rgb_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    run_train([*ARGS, "--data", str(tiny_rgb_data), "--run-dir", str(run_dir)])
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    rows = metrics(run_dir)
    expected = {key for row in rows for key in numeric_columns(row)}
    assert {"train_loss", "test_accuracy", "grad_norm", "lr_base", "images_per_s"} <= expected
    assert set(events.Tags()["scalars"]) == expected
    for key in expected:
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx({int(r["epoch"]): numeric_columns(r)[key] for r in rows
                                        if key in numeric_columns(r)}, rel=1e-6), key
