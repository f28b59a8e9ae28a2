from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrain.summaries import EventWriter, crc32c, new_run_dirs


def test_crc32c_known_value():
    assert crc32c(b"123456789") == 0xE3069283


def test_tensorboard_reads_our_event_files(tmp_path: Path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    w = EventWriter(tmp_path / "train")
    for step in (10, 20):
        w.scalar("accuracy", step / 100, step)
        w.histogram("final_retrain_ops/weights", np.linspace(-1, 1, 100), step)
    w.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path / "train"), size_guidance={"histograms": 0})
    acc.Reload()
    assert [(e.step, round(e.value, 3)) for e in acc.Scalars("accuracy")] == [(10, 0.1), (20, 0.2)]
    hist = acc.Histograms("final_retrain_ops/weights")
    assert hist[-1].histogram_value.num == 100


def test_new_run_never_reuses_a_folder_with_events(tmp_path: Path):
    train, val = new_run_dirs(tmp_path)
    assert train == tmp_path / "train" and val == tmp_path / "validation"
    EventWriter(train).close()
    train2, val2 = new_run_dirs(tmp_path)
    assert train2 != train and train2.parent.parent == tmp_path
    assert any(train.glob("events.*"))


def test_events_reach_the_file_during_training_not_only_at_close(tmp_path: Path, monkeypatch):
    """TensorBoard open during a run reads the file as it grows: events must be on disk within seconds."""
    import retrain.summaries

    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    clock = [1000.0]
    monkeypatch.setattr(retrain.summaries.time, "monotonic", lambda: clock[0])
    w = EventWriter(tmp_path / "train")  # the default, as training uses it

    def steps_on_disk() -> list[int]:
        acc = event_accumulator.EventAccumulator(str(tmp_path / "train"))
        acc.Reload()
        return [e.step for e in acc.Scalars("accuracy")] if "accuracy" in acc.Tags()["scalars"] else []

    assert w.path.stat().st_size > 0  # the file-version header: TensorBoard lists the run at once
    for step in range(10, 60, 10):  # five evaluations, 1 s apart
        clock[0] += 1.0
        w.scalars({"accuracy": step / 100, "cross_entropy": 1 - step / 100}, step)
    assert steps_on_disk() == [10, 20, 30, 40]  # on disk within 2 s of being written, long before close
    w.close()
    assert steps_on_disk() == [10, 20, 30, 40, 50]
