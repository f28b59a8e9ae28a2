#!/usr/bin/env python3
"""How ``--quality best`` should choose its backbone: choice rules replayed on real photo sets (docs/finetune.md).

    python benchmarks/backbone_choice.py /work/data/{textures,cutouts,gcompris,deepsky} --seeds 0 1 2 3 4 \
        --bottleneck_dir /work/data/.cache --work /tmp/backbone_choice

For every set and split seed (the outer split of benchmarks/accuracy.py: a disjoint 20% test set) and every
backbone in ``--backbones``, two things are recorded: which training + validation images the default run's
cross-fit gets right out of fold on that backbone's features (what best mode decides by), and the outer-test
accuracy of the default run's frozen model on that backbone (what the decision is for). Every rule below is
then scored by the test accuracy of the backbone it would have chosen; none of them sees the test set:

* ``default``: always the first backbone (Lite0);
* ``highest``: the highest out-of-fold accuracy among all backbones (ties to the earlier one);
* ``highest of A, B``: the same among two;
* ``clearly, z``: another backbone replaces the first only if it gets more images right by more than z
  standard deviations of the paired difference (``retrain.quality.clearly_better``); z = 1 is best mode's rule.

Rows are appended to ``WORK/rows.jsonl`` (one per set and seed) and reused by a rerun.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import _images, _link_training_folder, _outer_split  # noqa: E402
from best_mode import _run  # noqa: E402

BACKBONES = ("efficientnet_lite0", "mobilenet_v2", "efficientnet_lite2")


def record(folder: Path, seed: int, backbones, cache: str, work: Path) -> dict:
    from retrain import extract_features
    from retrain.config import TrainConfig
    from retrain.data import discover
    from retrain.quality import out_of_fold_hits

    labels, paths, y = _images(folder)
    y = np.array(y)
    table = extract_features([str(p) for p in paths], bottleneck_dir=cache, progress=False)
    keys = [table.keys[str(p)] for p in paths]
    test = _outer_split(paths, keys, y, 0.2, seed)
    tr, te = np.flatnonzero(~test), np.flatnonzero(test)
    train_dir = work / f"split-{folder.name}-{seed}"
    if not train_dir.exists():
        _link_training_folder(train_dir, [paths[i] for i in tr], labels, y[tr])
    dataset = discover(train_dir)
    cfg = TrainConfig(bottleneck_dir=cache, seed=seed, quiet=True)
    row = {"set": folder.name, "seed": seed, "oof": {}, "test": {}}
    scored = ([paths[i] for i in te], y[te], labels, cache)
    for name in backbones:
        feats = extract_features(dataset, architecture=name, bottleneck_dir=cache, progress=False)
        row["oof"][name] = out_of_fold_hits(cfg, dataset, feats, seed)
        acc: dict = {}
        _run(name, row=acc, train_dir=train_dir, prefix=work / f"run-{folder.name}-{seed}", seed=seed,
             test=scored, architecture=name)  # fmt: skip
        row["test"][name] = acc[name]
    return row


def rules(backbones) -> dict:
    from retrain.quality import clearly_better

    first = backbones[0]

    def highest(names):
        return lambda r: max(names, key=lambda n: (np.mean(list(r["oof"][n].values())), -names.index(n)))

    def clearly(names, z):
        def choose(r):
            gains = {n: clearly_better(r["oof"][first], r["oof"][n], z) for n in names[1:]}
            best = max(gains, key=lambda n: (gains[n], -names.index(n)))
            return best if gains[best] > 0 else first

        return choose

    out = {"default": lambda r: first, "highest": highest(list(backbones))}
    pairs = [[first, n] for n in backbones[1:]]
    for pair in pairs:
        out[f"highest of {', '.join(pair)}"] = highest(pair)
    for z in (1.0, 2.0):
        out[f"clearly, z={z:g}"] = clearly(list(backbones), z)
        for pair in pairs:
            out[f"clearly, z={z:g}, {', '.join(pair)}"] = clearly(pair, z)
    return out


def table(rows: list[dict], backbones) -> str:
    sets = list(dict.fromkeys(r["set"] for r in rows))
    seeds = {s: len([r for r in rows if r["set"] == s]) for s in sets}
    head = " | ".join(f"{s} ({seeds[s]} seeds)" for s in sets)
    lines = [f"| rule | {head} | mean | worst set vs default |", "|---|" + "---:|" * (len(sets) + 2)]
    for name, choose in rules(backbones).items():
        means, deltas = [], []
        for s in sets:
            rs = [r for r in rows if r["set"] == s]
            means.append(100 * np.mean([r["test"][choose(r)] for r in rs]))
            deltas.append(means[-1] - 100 * np.mean([r["test"][backbones[0]] for r in rs]))
        cells = " | ".join(f"{m:.1f}%" for m in means)
        lines.append(f"| {name} | {cells} | {np.mean(means):.1f}% | {min(deltas):+.1f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sets", nargs="+", type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    p.add_argument("--bottleneck_dir", default="/work/data/.cache")
    p.add_argument("--work", type=Path, default=Path("/tmp/backbone_choice"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / "rows.jsonl"
    rows = [json.loads(line) for line in store.read_text().splitlines()] if store.exists() else []
    done = {(r["set"], r["seed"]) for r in rows}
    with store.open("a") as out:
        for folder in args.sets:
            for seed in args.seeds:
                if (folder.name, seed) in done:
                    continue
                row = record(folder, seed, args.backbones, args.bottleneck_dir, args.work)
                print(json.dumps(row), file=out, flush=True)
                rows.append(row)
                print(folder.name, seed, {n: round(100 * a, 1) for n, a in row["test"].items()}, flush=True)
    wanted = {(f.name, s) for f in args.sets for s in args.seeds}
    print(table([r for r in rows if (r["set"], r["seed"]) in wanted], args.backbones))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
