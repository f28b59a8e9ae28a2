#!/usr/bin/env python3
"""Finding and checking ``--quality best``'s fine-tuning recipe on real photo sets (docs/finetune.md).

    python benchmarks/best_mode.py /work/data/textures --seeds 0 1 --configs best old blocks3
    python benchmarks/best_mode.py /work/data/textures --configs best --json out.json

For every set and split seed the images are split as benchmarks/accuracy.py does: a disjoint test set
(``--test_fraction`` of each class, by a hash of the seed and the image's group) and a training folder.

* the probe: ``LogisticRegressionCV`` (C from 1e-3..1e2 by 5-fold CV) on the frozen features of **100%**
  of the training folder, scored on the test set;
* the frozen head: retrain's new layer as ``--fine_tune`` fits it (training split of the training folder
  at the default 10% validation / 10% testing), scored on the test set;
* every ``--configs`` entry: ``retrain.finetune.fine_tune`` from that head, with the training folder's own
  validation split judging the epochs (and the never-worse guard), scored on the test set. The frozen
  part's outputs are computed once per (seed, blocks, distortions) and shared by the configurations.

The test set is never seen by the head, the probe or the fine-tuning: it stands in for the internal test
split and is only scored. The accuracy on it after every epoch is recorded too (not used for anything).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import _features, _images, _link_training_folder, _outer_split, _probe  # noqa: E402

# name -> (TrainConfig overrides, Recipe overrides); "best" is exactly --quality best.
CONFIGS: dict[str, tuple[dict, dict | None]] = {
    "best": ({"quality": "best"}, None),
    "old": ({"fine_tune": True}, {}),  # the original --fine_tune defaults
    "old6": (
        {"fine_tune": True, "fine_tune_blocks": "6", "fine_tune_patience": 100, "fine_tune_epochs": 8},
        {},
    ),
    "blocks3": ({"quality": "best", "fine_tune_blocks": "3"}, None),
    "blocks9": ({"quality": "best", "fine_tune_blocks": "9"}, None),
    "lr1e-4": ({"quality": "best", "fine_tune_learning_rate": 1e-4}, None),
    "lr1e-3": ({"quality": "best", "fine_tune_learning_rate": 1e-3}, None),
    "head10": ({"quality": "best"}, {"head_lr_multiplier": 10.0}),
    "nosmooth": ({"quality": "best"}, {"label_smoothing": 0.0}),
    "crop": ({"quality": "best", "random_crop": 10, "random_scale": 10}, None),
    "cropflip": ({"quality": "best", "random_crop": 10, "random_scale": 10, "flip_left_right": True}, None),
    "ep4": ({"quality": "best", "fine_tune_epochs": 4}, None),
    "ep12": ({"quality": "best", "fine_tune_epochs": 12}, None),
}


def _memoize_top_inputs():
    """Share the frozen part's outputs between configurations with the same blocks and distortions."""
    from retrain import finetune

    memo: dict = {}
    original = finetune._TopInputs.compute.__func__

    def compute(cls, cfg, spec, net, k, device, splits, distortions, copies):
        key = (id(splits), spec.name, k, repr(distortions), copies)
        if key not in memo:
            memo[key] = original(cls, cfg, spec, net, k, device, splits, distortions, copies)
        return memo[key]

    finetune._TopInputs.compute = classmethod(compute)
    return memo


TRACK: dict = {"log": [], "y": None}


def _track_test():
    """Record the test accuracy after every epoch (for the table only; nothing is chosen by it)."""
    from retrain import finetune

    original = finetune._Tuner._validate

    def validate(self):
        feats = self.features(self.inputs.test)
        W, b = self.head_weights()
        TRACK["log"].append(float(((feats @ W + b).argmax(1) == TRACK["y"]).mean()))
        return original(self)

    finetune._Tuner._validate = validate


def _refit(splits, n_classes: int, seed: int):
    """The new layer fitted again on training + validation features of the fine-tuned backbone, for the
    steps a cross-fit over them chooses (what the default run does on frozen features)."""
    from retrain.config import TrainConfig
    from retrain.fit import labelled_groups, plan_final_fit
    from retrain.head import SoftmaxHead
    from retrain.train import head_params

    labelled = splits.train + splits.validation
    params = head_params(TrainConfig())
    plan = plan_final_fit(
        labelled.X,
        labelled.y,
        labelled_groups(labelled.keys, labelled.paths),
        n_classes=n_classes,
        head_params=params,
        seed=seed,
    )
    return SoftmaxHead(**{**params, "steps": plan.steps}, seed=seed).fit(
        labelled.X, labelled.y, n_classes=n_classes
    )


def run_set(folder: Path, args, work: Path) -> dict:
    import torch

    from retrain import finetune
    from retrain.config import TrainConfig
    from retrain.data import discover
    from retrain.features import extract_features
    from retrain.head import SoftmaxHead
    from retrain.splits import Split, split_features
    from retrain.train import head_params

    labels, paths, y_all = _images(folder)
    y_all = np.array(y_all)
    ok, X, keys = _features(paths, args.bottleneck_dir)
    paths, y = [paths[i] for i in ok], y_all[ok]
    out = {"set": str(folder), "images": len(y), "classes": len(labels), "runs": []}
    for seed in args.seeds:
        test = _outer_split(paths, keys, y, args.test_fraction, seed)
        tr, te = np.flatnonzero(~test), np.flatnonzero(test)
        row = {"seed": seed, "train_folder": len(tr), "test": len(te)}
        memo = work / f"probe-{folder.name}-{seed}-{args.test_fraction}.json"  # the probe is slow: once
        if memo.exists():
            row.update(json.loads(memo.read_text()))
        else:
            t0 = time.perf_counter()
            probe, c = _probe(X[tr], y[tr])
            row["probe"], row["probe_C"] = float((probe.predict(X[te]) == y[te]).mean()), c
            row["probe_seconds"] = time.perf_counter() - t0
            memo.write_text(json.dumps({k: row[k] for k in ("probe", "probe_C", "probe_seconds")}))
        train_dir = work / f"split-{folder.name}-{seed}"
        if not train_dir.exists():
            _link_training_folder(train_dir, [paths[i] for i in tr], labels, y[tr])
        dataset = discover(train_dir)
        assert dataset.labels == labels
        table = extract_features(dataset, bottleneck_dir=args.bottleneck_dir)
        splits = split_features(dataset, table, validation_percentage=10, testing_percentage=10)
        outer = Split(X[te], y[te].astype(np.int64), [str(paths[i]) for i in te], [keys[i] for i in te])
        splits = dataclasses.replace(splits, test=outer)
        row["train"], row["validation"] = len(splits.train.y), len(splits.validation.y)
        head = SoftmaxHead(**head_params(TrainConfig()), seed=seed).fit(
            splits.train.X,
            splits.train.y,
            n_classes=len(labels),
            X_val=splits.validation.X,
            y_val=splits.validation.y,
        )
        row["frozen_head"] = float((head.predict(outer.X) == outer.y).mean())
        print(json.dumps(row), file=sys.stderr, flush=True)
        for name in args.configs:
            overrides, recipe_overrides = CONFIGS[name]
            # the recipe first, then the variant's settings (apply_quality keeps only non-default values)
            quality = {k: v for k, v in overrides.items() if k == "quality"}
            cfg = finetune.apply_quality(dataclasses.replace(TrainConfig(), **quality))
            cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if k != "quality"})
            recipe = finetune.recipe_for(cfg)
            if recipe_overrides is not None:
                recipe = dataclasses.replace(
                    recipe if overrides.get("quality") == "best" else finetune.Recipe(), **recipe_overrides
                )
            per_epoch: list[float] = []
            TRACK["log"], TRACK["y"] = per_epoch, outer.y
            torch.manual_seed(seed)
            t1 = time.perf_counter()
            tuned = finetune.fine_tune(head, splits, config=cfg, seed=seed, recipe=recipe)
            seconds = time.perf_counter() - t1
            acc = float((tuned.head.predict(tuned.splits.test.X) == outer.y).mean())
            h = tuned.result.history
            t2 = time.perf_counter()
            refit = _refit(tuned.splits, len(labels), seed) if tuned.backbone_onnx is not None else None
            row[name] = {
                "test": acc,
                "refit_train_val": None
                if refit is None
                else float((refit.predict(outer.X) == outer.y).mean()),
                "refit_seconds": time.perf_counter() - t2,
                "kept_epoch": tuned.result.best_epoch,
                "epochs": tuned.result.epochs_run,
                "seconds": seconds,
                "val": [r.validation_accuracy for r in h],
                "test_per_epoch": per_epoch,
            }
            print(
                json.dumps({"set": folder.name, "seed": seed, name: row[name]}), file=sys.stderr, flush=True
            )
        out["runs"].append(row)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sets", nargs="+")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--configs", nargs="+", default=["best"], choices=sorted(CONFIGS))
    p.add_argument("--test_fraction", type=float, default=0.2)
    p.add_argument("--bottleneck_dir", default=os.environ.get("RETRAIN_BENCH_CACHE", "/work/data/.cache"))
    p.add_argument("--work", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    _memoize_top_inputs()
    _track_test()
    work = Path(args.work or tempfile.mkdtemp(prefix="retrain-best-"))
    work.mkdir(parents=True, exist_ok=True)
    results = [run_set(Path(s), args, work) for s in args.sets]
    text = json.dumps(results, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
