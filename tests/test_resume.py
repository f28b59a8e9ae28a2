"""--resume continues only an unfinished run, and only with the settings it was started with."""

from __future__ import annotations

from pathlib import Path

import pytest

import retrain
from retrain.errors import RetrainError


@pytest.fixture
def fast_config(fast_config):
    """Head checkpoints belong to the step-trained layer; the L-BFGS one is solved again from the cache."""
    return {**fast_config, "head_solver": "steps"}


def test_resume_alone_never_reopens_a_finished_run(
    tmp_path: Path, colour_dir: Path, fast_config, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    cfg = {k: v for k, v in fast_config.items() if k != "output_dir"}  # the default retrain_runs/<time>
    finished = retrain.train(colour_dir, **cfg)
    before = {p.name: p.stat().st_mtime_ns for p in finished.run_dir.iterdir() if p.is_file()}
    again = retrain.train(colour_dir, **cfg, resume=True)
    assert again.run_dir != finished.run_dir  # a new run, not the finished one overwritten
    assert {p.name: p.stat().st_mtime_ns for p in finished.run_dir.iterdir() if p.is_file()} == before
    assert (Path("retrain_runs") / "latest").resolve() == again.run_dir.resolve()


def test_resume_alone_continues_the_unfinished_run(
    tmp_path: Path, colour_dir: Path, fast_config, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    cfg = {k: v for k, v in fast_config.items() if k != "output_dir"}
    interrupted = retrain.train(colour_dir, **cfg)
    (interrupted.run_dir / "metrics.json").unlink()  # as a run killed before its end leaves it
    again = retrain.train(colour_dir, **cfg, resume=True)
    assert again.run_dir == interrupted.run_dir and (again.run_dir / "metrics.json").exists()


@pytest.mark.parametrize(
    "change",
    [
        {"learning_rate": 0.05},
        {"optimizer": "sgd"},
        {"train_batch_size": 20},
        {"class_balance": "weight"},
        {"flip_left_right": True},
    ],
)
def test_resume_refuses_a_head_checkpoint_made_with_other_settings(colour_dir: Path, fast_config, change):
    retrain.train(colour_dir, **fast_config)
    same = retrain.train(colour_dir, **fast_config, resume=True)  # the same settings continue (nothing left)
    assert same.test_accuracy == 1.0
    name = next(iter(change))
    with pytest.raises(
        RetrainError, match=rf"checkpoint .* belongs to a run with other settings \(.*{name}.*remove it"
    ):
        retrain.train(colour_dir, **fast_config, **change, resume=True)


def test_resume_refuses_a_head_checkpoint_of_another_backbone(colour_dir: Path, fast_config):
    retrain.train(colour_dir, **fast_config)
    import test_finetune  # registers the 8-feature stand-in backbone

    with pytest.raises(RetrainError, match=r"other settings \(architecture"):
        retrain.train(colour_dir, **{**fast_config, "architecture": test_finetune.TINY_BN}, resume=True)
