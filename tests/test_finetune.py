"""--fine_tune: the top of the backbone trains with the new layer; BN stays frozen; export; resume after kill -9."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import retrain
from conftest import SAMPLE_PHOTOS, make_image_folder
from retrain.backbones import BackboneSpec, FeatureNet, Preprocessing, available_backbones, register_backbone
from retrain.data import TESTING, assign_splits, discover
from retrain.errors import RetrainError
from retrain.finetune import epoch_rows, first_unfrozen_block
from retrain.torch_modules import PixelsToFeatures

TESTS = Path(__file__).resolve().parent
TINY_BN = "tiny_bn_test_backbone"
BUILT: list[nn.Module] = []  # every TINY_BN network built, so a test can inspect the one that was fine-tuned


class _TinyBN(FeatureNet):
    """conv -> BN -> ReLU6 -> conv -> BN -> ReLU6, with BN statistics far from what the images produce."""

    def __init__(self):
        super().__init__()
        self.feature_dim = 8
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU6()),
                nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU6()),
            ]
        )
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x.mean(dim=(2, 3))


def _build_tiny_bn():
    net = _TinyBN().eval()
    BUILT.append(net)
    return net


if TINY_BN not in available_backbones():
    register_backbone(
        BackboneSpec(
            name=TINY_BN,
            feature_dim=8,
            build=_build_tiny_bn,
            weights_id="tiny-bn-seed0",
            preprocessing=Preprocessing(input_size=32, mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)),
        )
    )


def _report(out_dir: Path) -> dict:
    return json.loads((out_dir / "fine_tune.json").read_text())


def _test_images(image_dir: Path) -> tuple[list[str], np.ndarray]:
    ds = assign_splits(discover(image_dir), validation_percentage=10, testing_percentage=10)
    return [r.path for r in ds.split(TESTING)], np.array([r.label_index for r in ds.split(TESTING)])


# -- settings ------------------------------------------------------------------------------------------


def test_fine_tune_blocks_counts_from_the_top():
    assert first_unfrozen_block("3", 18) == 15
    assert first_unfrozen_block(1, 18) == 17
    assert first_unfrozen_block("all", 18) == 0
    assert first_unfrozen_block("ALL", 18) == 0
    for bad in ("0", "19", "three", ""):
        with pytest.raises(RetrainError, match=r"--fine_tune_blocks must be a number of blocks from 1 to 18"):
            first_unfrozen_block(bad, 18)


def test_epochs_draw_by_the_class_balance_policy():
    y = np.array([0] * 90 + [1] * 10)
    rng = np.random.default_rng(0)
    rows, w = epoch_rows(y, 2, "sample", rng)
    assert len(rows) == 100 and np.all(w == 1)
    share = np.mean([np.mean(y[epoch_rows(y, 2, "sample", rng)[0]]) for _ in range(50)])
    assert share == pytest.approx(0.5, abs=0.03)  # the small class is drawn as often as the large one
    rows, w = epoch_rows(y, 2, "none", rng)
    assert sorted(rows) == list(range(100)) and np.all(w == 1)
    rows, w = epoch_rows(y, 2, "weight", rng)
    assert sorted(rows) == list(range(100))
    assert w[y[rows] == 0].sum() == pytest.approx(
        w[y[rows] == 1].sum()
    )  # each class weighs the same in the loss
    rows, _ = epoch_rows(y, 2, "none", rng, copies=4)
    assert sorted(rows // 4) == list(range(100)) and set(rows % 4) <= {0, 1, 2, 3}


# -- training -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fine_tuning_improves_a_weak_head_and_keeps_bn_statistics(
    tmp_path: Path, colour_dir: Path, fast_config
):
    BUILT.clear()
    cfg = {**fast_config, "architecture": TINY_BN, "how_many_training_steps": 3, "learning_rate": 0.003}
    frozen = retrain.train(colour_dir, **{**cfg, "output_dir": str(tmp_path / "frozen")})
    tuned = retrain.train(
        colour_dir,
        **cfg,
        fine_tune=True,
        fine_tune_blocks="all",
        fine_tune_epochs=8,
        fine_tune_learning_rate=3e-3,
        fine_tune_patience=8,
    )
    report = _report(Path(fast_config["output_dir"]))
    before = report["history"][0]["validation_accuracy"]
    best = report["history"][report["best_epoch"]]
    assert report["best_epoch"] > 0 and best["validation_loss"] < report["history"][0]["validation_loss"]
    assert best["validation_accuracy"] >= before
    assert tuned.test_accuracy >= frozen.test_accuracy and tuned.test_accuracy >= 0.9

    # The network that was fine-tuned (built second; the first was for feature extraction or export).
    net = BUILT[-1]
    fresh = _TinyBN()
    for (name, got), want in zip(net.named_buffers(), fresh.buffers()):
        if "running" in name or "num_batches" in name:
            assert torch.equal(got, want), f"BN statistic {name} changed"
    assert not torch.equal(net.blocks[0][0].weight, fresh.blocks[0][0].weight)  # but the weights did train
    assert not torch.equal(net.blocks[1][1].weight, fresh.blocks[1][1].weight)  # BN scale trains too

    # The exported model is the fine-tuned network + new layer: same probabilities as PyTorch gives.
    clf = retrain.load(tuned.output_graph)
    assert clf.manifest["fine_tuned"] is True
    paths, labels = _test_images(colour_dir)
    pixels = np.stack([clf.to_pixels(p) for p in paths])
    model = onnx.load(str(tuned.output_graph))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    with torch.no_grad():
        feats = PixelsToFeatures(net, clf.preprocessing)(torch.from_numpy(pixels)).numpy()
    logits = feats @ init["final_retrain_ops/weights"] + init["final_retrain_ops/biases"]
    want = np.exp(logits - logits.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    got = clf.predict_proba(pixels)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # and the printed test accuracy is that model's
    assert np.mean(got.argmax(1) == labels) == pytest.approx(tuned.test_accuracy)


@pytest.mark.slow
def test_fine_tuning_with_distortions_and_top_blocks_only(tmp_path: Path, colour_dir: Path, fast_config):
    result = retrain.train(
        colour_dir,
        **fast_config,
        fine_tune=True,
        fine_tune_blocks="1",
        fine_tune_epochs=2,
        flip_left_right=True,
        random_crop=10,
        distorted_copies=2,
        class_balance="weight",
    )
    report = _report(Path(fast_config["output_dir"]))
    assert report["unfrozen_blocks"] == 1 and report["epochs_run"] == 2
    assert result.test_accuracy == 1.0


def test_no_validation_split_runs_every_epoch(tmp_path: Path, colour_dir: Path, fast_config, caplog):
    retrain.train(
        colour_dir,
        **fast_config,
        validation_percentage=0,
        fine_tune=True,
        fine_tune_blocks="all",
        fine_tune_epochs=2,
        fine_tune_patience=1,
    )
    assert _report(Path(fast_config["output_dir"]))["epochs_run"] == 2
    assert "No validation images: fine-tuning ran all 2 epochs" in caplog.text


@pytest.mark.slow
def test_lite0_fine_tune_smoke(tmp_path: Path):
    """The real backbone: top block only, two epochs, on a few sample photos; the model reloads and classifies."""
    photos = tmp_path / "photos"
    for cls in ("animals", "tools"):
        (photos / cls).mkdir(parents=True)
        for f in sorted((SAMPLE_PHOTOS / cls).iterdir())[:12]:
            shutil.copy(f, photos / cls / f.name)
    result = retrain.train(
        photos,
        bottleneck_dir=str(tmp_path / "bn"),
        output_dir=str(tmp_path / "out"),
        model_dir=str(tmp_path / "models"),
        how_many_training_steps=50,
        seed=0,
        quiet=True,
        fine_tune=True,
        fine_tune_blocks="1",
        fine_tune_epochs=2,
    )
    assert _report(tmp_path / "out")["epochs_run"] >= 1
    clf = retrain.load(result.output_graph)
    assert clf.manifest["backbone"]["name"] == "efficientnet_lite0"
    top = [clf.classify(str(p))[0][0].label for p in sorted((photos / "tools").iterdir())[:4]]
    assert top.count("tools") >= 3


# -- kill -9 and resume -------------------------------------------------------------------------------

# Runs `retrain ARGS` with the test backbones registered, and SIGKILLs itself at the KILL_AT_STEP-th
# fine-tuning step (Adam is used by fine-tuning only: the new layer trains in NumPy).
RUNNER = f"""
import os, signal, sys
sys.path.insert(0, {str(TESTS)!r})
import conftest, test_finetune
import torch
kill_at, count = int(os.environ.get("KILL_AT_STEP", "0")), 0
real_step = torch.optim.Adam.step
def step(self, *args, **kwargs):
    global count
    # Only the run's own Adam: the time estimate's steps on a copy use AdamW (an Adam subclass).
    count += type(self) is torch.optim.Adam
    if kill_at and count == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(self, *args, **kwargs)
torch.optim.Adam.step = step
from retrain.cli import retrain_main
sys.exit(retrain_main())
"""


@pytest.mark.slow
def test_kill_9_during_fine_tuning_then_resume_matches_an_uninterrupted_run(tmp_path: Path):
    images = make_image_folder(tmp_path / "images", per_class=16, size=40)
    common = dict(
        architecture=TINY_BN,
        how_many_training_steps=30,
        eval_step_interval=10,
        seed=3,
        quiet=True,
        bottleneck_dir=str(tmp_path / "bn"),
        model_dir=str(tmp_path / "models"),
        train_batch_size=16,
        fine_tune=True,
        fine_tune_blocks="all",
        fine_tune_epochs=6,
        fine_tune_patience=100,
        fine_tune_learning_rate=3e-3,
    )
    reference = retrain.train(images, **common, output_dir=str(tmp_path / "reference"))
    ref_report = _report(tmp_path / "reference")
    assert ref_report["epochs_run"] == 6

    # The interrupted run uses the default output folder (retrain_runs/<time>), like a user would.
    work = tmp_path / "work"
    work.mkdir()
    steps_per_epoch = -(-reference.metrics["train_count"] // 16)
    args = ["--image_dir", str(images)]
    for name, value in common.items():
        if value is True:
            args.append(f"--{name}")
        else:
            args += [f"--{name}", str(value)]
    env = {**os.environ, "KILL_AT_STEP": str(3 * steps_per_epoch + 2)}  # in the middle of epoch 4
    victim = subprocess.run(
        [sys.executable, "-c", RUNNER, *args], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert victim.returncode == -signal.SIGKILL, victim.stdout + victim.stderr
    (run_dir,) = (work / "retrain_runs").iterdir()
    assert (run_dir / "checkpoint-finetune.pt").exists() and not (run_dir / "output_graph.onnx").exists()
    assert "Fine-tune epoch 3/6" in victim.stdout and "Fine-tune epoch 4/6" not in victim.stdout

    # `retrain --resume` without --output_dir finds that run and continues it.
    resumed = subprocess.run(
        [sys.executable, "-c", RUNNER, *args, "--resume"],
        cwd=work,
        env={**os.environ, "KILL_AT_STEP": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "fine-tuning continues after epoch 3" in resumed.stdout
    assert sorted(p.name for p in (work / "retrain_runs").iterdir()) == sorted([run_dir.name, "latest"])
    report = _report(run_dir)
    assert report["resumed_after_epoch"] == 3
    assert (
        report["epochs_run"] == ref_report["epochs_run"] and report["best_epoch"] == ref_report["best_epoch"]
    )
    assert [h["validation_accuracy"] for h in report["history"]] == [
        h["validation_accuracy"] for h in ref_report["history"]
    ]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_accuracy"] == reference.test_accuracy
    paths, _ = _test_images(images)
    got = retrain.load(run_dir / "output_graph.onnx").classify(paths, top_k=None)
    want = retrain.load(reference.output_graph).classify(paths, top_k=None)
    np.testing.assert_allclose(
        [p.score for r in got for p in r], [p.score for r in want for p in r], atol=1e-5
    )
    # The child trained and fine-tuned the stand-in backbone (registered there by importing this module).
    manifest = retrain.load(run_dir / "output_graph.onnx").manifest
    assert manifest["backbone"]["name"] == TINY_BN and manifest["fine_tuned"] is True


def test_resume_refuses_a_fine_tuning_checkpoint_from_other_settings(colour_dir: Path, fast_config):
    flags = dict(fine_tune=True, fine_tune_blocks="all", fine_tune_epochs=2)
    retrain.train(colour_dir, **fast_config, **flags)
    again = retrain.train(
        colour_dir, **fast_config, **flags, resume=True
    )  # same settings: nothing left to do
    assert _report(Path(fast_config["output_dir"]))["resumed_after_epoch"] == 2 and again.test_accuracy == 1.0
    with pytest.raises(RetrainError, match=r"checkpoint .* belongs to a run with other settings.*remove it"):
        retrain.train(colour_dir, **fast_config, **{**flags, "fine_tune_learning_rate": 1e-3}, resume=True)


# -- --quality best ----------------------------------------------------------------------------------


def test_quality_best_resolves_to_the_measured_recipe():
    from retrain.cli import training_parser
    from retrain.config import ConfigError, TrainConfig
    from retrain.finetune import BEST_RECIPE, BEST_SETTINGS, Recipe, apply_quality, recipe_for

    ns = training_parser().parse_args(["--quality", "best"])
    cfg = apply_quality(TrainConfig(**vars(ns)).validate())
    # best mode runs its own fine-tuning stage (retrain.quality): --fine_tune's train-only path stays off
    assert {k: getattr(cfg, k) for k in BEST_SETTINGS} == BEST_SETTINGS and not cfg.fine_tune
    assert recipe_for(cfg) == BEST_RECIPE and BEST_RECIPE.schedule == "cosine" and BEST_RECIPE.keep == "last"
    assert not apply_quality(TrainConfig(quality="best", fine_tune=True)).fine_tune
    # a fine-tuning flag the user changed from its default still applies
    ns = training_parser().parse_args(
        ["--quality", "best", "--fine_tune_blocks", "9", "--fine_tune_epochs", "2"]
    )
    cfg = apply_quality(TrainConfig(**vars(ns)))
    assert (cfg.fine_tune_blocks, cfg.fine_tune_epochs) == ("9", 2)
    assert cfg.fine_tune_learning_rate == BEST_SETTINGS["fine_tune_learning_rate"]
    # the default run and the old --fine_tune are unchanged
    assert (
        apply_quality(TrainConfig()) == TrainConfig() and recipe_for(TrainConfig(fine_tune=True)) == Recipe()
    )
    with pytest.raises(ConfigError, match="--quality 'fast' is not allowed"):
        TrainConfig(quality="fast").validate()


def test_cosine_schedule_warms_up_then_decays_to_zero():
    from retrain.finetune import BEST_RECIPE, Recipe

    f = [BEST_RECIPE.factor(s, 100, 10) for s in range(100)]
    assert f[0] < f[5] < f[9] < 1.0 and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] < 0.01
    assert {Recipe().factor(s, 100, 10) for s in range(100)} == {1.0}


def test_quality_best_prints_an_estimate_first_and_fine_tunes(
    tmp_path: Path, colour_dir: Path, fast_config, caplog
):
    caplog.set_level(logging.INFO, logger="retrain")
    retrain.train(
        colour_dir,
        **{**fast_config, "architecture": TINY_BN, "quiet": False},
        quality="best",
        fine_tune_epochs=2,
        fine_tune_learning_rate=3e-3,
    )
    text = caplog.text
    # the whole run's estimate comes before any features are computed, the measured one before epoch 1
    up_front = text.index("best quality: about")
    assert up_front < text.index("Bottlenecks:") and "fine-tuning 6 blocks for 2 epochs" in text
    assert "(--architecture was given, so no backbone choice)" in text
    assert "best quality: fine-tuning 2 backbone blocks for up to 2 epochs of" in text
    estimate = text.index("best quality: fine-tuning")
    assert "on this CPU" in text[estimate:] and estimate < text.index("Fine-tune epoch 1/2")
    report = _report(Path(fast_config["output_dir"]))
    assert report["unfrozen_blocks"] == 2 and report["epochs_run"] == 2  # blocks "6" = all of this one's 2
    assert report["best_epoch"] == 2  # the recipe keeps the last epoch, chosen by no score
    assert report["backbone_choice"]["backbone"] == TINY_BN
    verdict = (
        "keeping the fine-tuned network" if report["fine_tuned"] else "keeping the frozen-backbone model"
    )
    assert f"on the same {report['validation_images']} validation images" in text and verdict in text
    metrics = json.loads((Path(fast_config["output_dir"]) / "metrics.json").read_text())
    # a kept fine-tuned backbone: the default run's layer, solved again on its features, then refolded
    if report["fine_tuned"]:
        assert "the new layer is solved again on the fine-tuned backbone's features" in text
        assert metrics["final_fit"] == "all" and metrics["head_solver"] == "lbfgs"
        assert metrics["crossfit"]["count"] == metrics["final_fit_count"] - metrics["test_count"]


def test_quality_best_keeps_the_frozen_model_when_validation_gets_worse(
    tmp_path: Path, colour_dir: Path, fast_config, caplog
):
    caplog.set_level(logging.INFO, logger="retrain")
    cfg = {**fast_config, "architecture": TINY_BN, "quiet": False}
    # the model fine-tuning has to beat: the default run's, fitted on training + validation
    frozen = retrain.train(colour_dir, **{**cfg, "output_dir": str(tmp_path / "frozen")})
    # a learning rate that wrecks the network: every epoch is worse than the start on validation
    best = retrain.train(colour_dir, **cfg, quality="best", fine_tune_epochs=2, fine_tune_learning_rate=50.0)
    report = _report(Path(cfg["output_dir"]))
    assert report["best_epoch"] == 2 and report["epochs_run"] == 2 and report["fine_tuned"] is False
    assert report["fine_tuned_validation_accuracy"] <= report["frozen_validation_accuracy"]
    assert "keeping the frozen-backbone model fitted on all training+validation images" in caplog.text
    assert retrain.load(best.output_graph).manifest.get("fine_tuned") is not True
    assert best.test_accuracy == frozen.test_accuracy
    same = ("accuracy", "best_steps", "weight_decay")
    assert best.metrics["final_fit"] == "all"
    assert [best.metrics["crossfit"][k] for k in same] == [frozen.metrics["crossfit"][k] for k in same]
