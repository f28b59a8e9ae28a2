"""The features of the training, validation and test splits: what every stage after extraction works on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from retrain.data import TESTING, TRAINING, VALIDATION, Dataset, assign_splits, drop_records
from retrain.features import FeatureTable


@dataclass
class Split:
    """Features and labels of one split; ``paths`` and their content ``keys`` align with the rows."""

    X: np.ndarray  # (N, D) float32
    y: np.ndarray  # (N,) int64 label indices
    paths: list[str]
    keys: list[bytes]

    def __len__(self) -> int:
        return len(self.y)

    def __add__(self, other: Split) -> Split:
        """The rows of both, this split's first."""
        return Split(
            np.concatenate([self.X, other.X]),
            np.concatenate([self.y, other.y]),
            self.paths + other.paths,
            self.keys + other.keys,
        )


@dataclass
class Splits:
    """The three splits and the dataset they come from (its records carry their split)."""

    train: Split
    validation: Split
    test: Split
    dataset: Dataset

    @property
    def labels(self) -> list[str]:
        return self.dataset.labels

    def with_features(self, train: np.ndarray, validation: np.ndarray, test: np.ndarray) -> Splits:
        """The same images with other features (e.g. from a fine-tuned backbone)."""
        return Splits(
            dataclasses.replace(self.train, X=train),
            dataclasses.replace(self.validation, X=validation),
            dataclasses.replace(self.test, X=test),
            self.dataset,
        )


def split_features(
    dataset: Dataset,
    features: FeatureTable,
    *,
    validation_percentage: float = 10,
    testing_percentage: float = 10,
) -> Splits:
    """Leave out the files extraction skipped, split the rest as retrain.py does, gather each split's features."""
    dataset = drop_records(dataset, set(features.skipped))
    dataset = assign_splits(
        dataset,
        validation_percentage=validation_percentage,
        testing_percentage=testing_percentage,
        keys=features.keys,  # identical files share a split: no photo is both trained on and tested
    )

    def one(name: str) -> Split:
        records = dataset.split(name)
        paths = [r.path for r in records]
        return Split(
            features.matrix(paths),
            np.array([r.label_index for r in records], dtype=np.int64),
            paths,
            [features.keys[p] for p in paths],
        )

    return Splits(one(TRAINING), one(VALIDATION), one(TESTING), dataset)
