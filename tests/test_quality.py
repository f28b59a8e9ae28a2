"""--quality best's decisions (retrain.quality): the backbone by out-of-fold accuracy, fine-tuning kept only if it
wins on the validation images, and when no backbone is chosen."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import TINY
from retrain import quality
from retrain.config import TrainConfig
from retrain.data import discover
from retrain.features import extract_features
from test_finetune import TINY_BN


def test_no_backbone_choice_when_the_user_named_one_or_features_come_from_elsewhere():
    assert quality.why_not_choose(TrainConfig()) == ""
    assert "--architecture" in quality.why_not_choose(TrainConfig(architecture="mobilenet_v2"))
    assert "--architecture" in quality.why_not_choose(TrainConfig(tfhub_module="x"))
    assert "reduced-precision" in quality.why_not_choose(TrainConfig(extraction_precision="int8"))
    assert quality.CANDIDATES[0] == TrainConfig().architecture  # ties go to the default (cheapest) backbone


def _hits(right: int, n: int = 40) -> dict[str, bool]:
    return {f"img{i}.jpg": i < right for i in range(n)}


def test_another_backbone_only_replaces_the_default_when_it_is_clearly_better():
    assert quality.clearly_better(_hits(20), _hits(30)) == 10  # 10 wins, 0 losses: 10 > sqrt(10)
    assert quality.clearly_better(_hits(30), _hits(20)) == 0  # worse
    assert quality.clearly_better(_hits(20), _hits(21)) == 0  # 1 > sqrt(1) is false: noise
    # 8 more right overall, but from 20 wins against 12 losses: 8 > sqrt(32) = 5.7, clearly better
    base = {f"img{i}.jpg": i < 12 for i in range(40)}
    other = {f"img{i}.jpg": 12 <= i < 32 for i in range(40)}
    assert quality.clearly_better(base, other) == 8
    # 3 more from 10 wins, 7 losses: 3 < sqrt(17) = 4.1, not clearly better
    other = {f"img{i}.jpg": (i < 5) or (12 <= i < 22) for i in range(40)}
    assert quality.clearly_better(base, other) == 0
    assert quality.clearly_better({}, {}) == 0


def test_the_clearly_better_backbone_is_chosen(tmp_path: Path, colour_dir: Path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="retrain")
    cfg = TrainConfig(bottleneck_dir=str(tmp_path / "b"), how_many_training_steps=100, quiet=True)
    ds = discover(colour_dir)
    spec_table = extract_features(ds, architecture=TINY, bottleneck_dir=cfg.bottleneck_dir)
    from retrain.backbones import get_backbone

    spec = get_backbone(TINY)
    # rig the scores: the second candidate wins, whatever the features say
    scores = iter([_hits(20), _hits(30)])
    monkeypatch.setattr(quality, "out_of_fold_hits", lambda *a: next(scores))
    chosen, table, choice = quality.choose_backbone(cfg, ds, spec, spec_table, 0, candidates=(TINY, TINY_BN))
    assert chosen.name == TINY_BN and choice.name == TINY_BN and table is not spec_table
    assert choice.out_of_fold == {TINY: 0.5, TINY_BN: 0.75} and choice.images == 40
    assert f"best quality: backbone {TINY_BN}: out-of-fold accuracy 75.0% on the 40 training+validation" in (
        caplog.text
    )
    assert f"vs {TINY} 50.0%; 10 more images right than {TINY}" in caplog.text
    # a small lead is noise: the default backbone is kept, and the run's own table is reused for it
    scores = iter([_hits(20), _hits(21)])
    chosen, table, _ = quality.choose_backbone(cfg, ds, spec, spec_table, 0, candidates=(TINY, TINY_BN))
    assert chosen.name == TINY and table is spec_table
    assert "no other backbone is clearly better" in caplog.text


def test_the_real_cross_fit_scores_each_candidate(tmp_path: Path, colour_dir: Path):
    cfg = TrainConfig(bottleneck_dir=str(tmp_path / "b"), how_many_training_steps=100)
    ds = discover(colour_dir)
    table = extract_features(ds, architecture=TINY, bottleneck_dir=cfg.bottleneck_dir)
    hits = quality.out_of_fold_hits(cfg, ds, table, 0)
    # training + validation only: the test split is left out
    assert 0 < len(hits) < len(ds.records) and set(hits.values()) <= {True, False}
    assert set(hits) <= {str(r.path) for r in ds.records}


def test_the_frozen_model_is_scored_on_the_validation_rows_of_the_cross_fit():
    # the cross-fit's rows are training (3) then validation (2): only the last two count
    logits = np.array([[9, 0], [9, 0], [9, 0], [0, 9], [9, 0]], np.float32)
    plan = SimpleNamespace(cross=SimpleNamespace(logits=logits))
    assert quality.frozen_validation_accuracy(plan, 3, np.array([1, 1])) == pytest.approx(0.5)
    assert quality.frozen_validation_accuracy(plan, 3, np.array([], np.int64)) is None
    assert quality.frozen_validation_accuracy(SimpleNamespace(cross=None), 3, np.array([1])) is None


def test_the_up_front_estimate_names_every_candidate_stage(caplog):
    caplog.set_level(logging.INFO, logger="retrain")
    cfg = TrainConfig(architecture=TINY_BN, fine_tune_blocks="all", fine_tune_epochs=8)
    est = quality.log_estimate(cfg, 2000, chooses=False)
    ((features, tune),) = est.values()
    assert 0 < features < tune  # 8 epochs of forward + backward cost more than one forward pass
    assert "best quality: about" in caplog.text and "for 2000 images" in caplog.text


def test_fine_tuning_must_get_more_validation_images_right_not_a_float_rounding_more():
    from retrain.quality import beats

    tied = float(np.float32(20 / 29))  # the fine-tuned accuracy is computed in float32
    assert tied > 20 / 29  # the comparison that used to keep a model that only tied
    assert not beats(tied, 20 / 29, 29)
    assert beats(float(np.float32(21 / 29)), 20 / 29, 29)
    assert not beats(None, 20 / 29, 29) and not beats(19 / 29, 20 / 29, 29)
