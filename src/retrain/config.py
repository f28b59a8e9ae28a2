"""One typed config for a training run. The CLI only overrides these defaults.

Field names are retrain.py's flag names, so ``--how_many_training_steps 500`` on the
command line and ``train(..., how_many_training_steps=500)`` in Python mean the same.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

from retrain.errors import ConfigError


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "retrain"


@dataclass
class TrainConfig:
    # -- data -------------------------------------------------------------------------------
    image_dir: str = ""  # empty: the bundled sample photos
    testing_percentage: float = 10
    validation_percentage: float = 10
    # -- backbone ---------------------------------------------------------------------------
    architecture: str = "efficientnet_lite0"
    tfhub_module: str = ""  # retrain.py's name for the backbone; only our backbone names work
    model_dir: str = ""  # where the exported backbone is cached (default: ~/.cache/retrain/models)
    # -- bottleneck cache -------------------------------------------------------------------
    bottleneck_dir: str = ""  # default: ~/.cache/retrain/bottlenecks (content-keyed, shared safely)
    # -- new layer ----------------------------------------------------------------------------
    how_many_training_steps: int = 4000
    learning_rate: float = 0.01
    train_batch_size: int = 100
    eval_step_interval: int = 10
    validation_batch_size: int = 100
    test_batch_size: int = -1
    optimizer: str = "adam"
    weight_decay: float | None = (
        None  # None: chosen by the cross-fit (retrain.fit.WEIGHT_DECAYS); 0 with --final_fit train
    )
    class_balance: str = "sample"
    final_fit: str = "all"  # what the exported layer learns from: train, train+val or all (see fit.py)
    # How the layer is fitted in the train+val and all modes: "lbfgs" solves an L2-regularised logistic
    # regression with the strength chosen by the cross-fit (retrain.logreg); "steps" takes the cross-fit's
    # number of mini-batch steps. --final_fit train (retrain.py's way) and fine-tuning always take steps.
    head_solver: str = "lbfgs"
    seed: int | None = None
    # -- several labels per photo (retrain.multilabel, docs/multilabel.md) ----------------------
    multi_label: bool = False  # one sigmoid output per label; a photo in several class folders has them all
    labels_file: str = ""  # CSV path,labels or JSON lines, paths relative to image_dir (implies multi_label)
    multi_label_threshold: float | None = None  # None: a threshold per label, tuned on held-out images
    # -- open world: calibrated confidence and the unknown answer ------------------------------
    calibration: str = "temperature"  # or "none"
    unknown_threshold: float | None = None  # None: chosen automatically (accept 95% of known images)
    # -- distortions (training images only) ------------------------------------------------
    flip_left_right: bool = False
    random_crop: float = 0
    random_scale: float = 0
    random_brightness: float = 0
    distorted_copies: int = 0  # 0: choose automatically when a distortion is on
    # -- fine-tuning --------------------------------------------------------------------------
    fine_tune: bool = False
    fine_tune_blocks: str | int = "3"  # a count from the top, or "all"
    fine_tune_epochs: int = 10
    fine_tune_learning_rate: float = 1e-4
    fine_tune_patience: int = 3
    quality: str = "default"  # "best": backbone by cross-fit, then fine-tuning if it wins (retrain.quality)
    resume: bool = False
    # -- outputs -------------------------------------------------------------------------------
    output_dir: str = ""  # default: ./retrain_runs/<time>; other outputs default inside it
    output_graph: str = ""
    output_labels: str = ""
    summaries_dir: str = ""
    checkpoint_path: str = ""
    intermediate_output_graphs_dir: str = ""
    intermediate_store_frequency: int = 0
    saved_model_dir: str = ""
    final_tensor_name: str = "final_result"
    quantize: str = ""  # "", "int8" or "fp16": also write a quantized copy
    print_misclassified_test_images: bool = False
    no_report: bool = False  # skip the audit and report.html (label issues, duplicates, learning curve)
    # -- running -------------------------------------------------------------------------------
    device: str = "auto"
    batch_size: int = (
        0  # images per forward pass; 0 = automatic (the engine's batch_size, engines.AUTO_BATCH)
    )
    num_workers: int = 0  # decode threads; 0 = automatic
    engine: str = "local"  # "ray": extract on a Ray cluster (retrain.distributed)
    ray_address: str = (
        ""  # with engine "ray": auto, HOST:PORT or ray://HOST:PORT; empty = Ray on this machine
    )
    extraction_precision: str = "float32"  # "int8": quantized backbone (retrain.precision)
    strict: bool = False
    quiet: bool = False
    logging_verbosity: str = "INFO"

    @property
    def pixel_batch_size(self) -> int:
        """Images per forward pass for distortions and fine-tuning: ``batch_size``, or 32 when automatic."""
        return self.batch_size or 32

    def validate(self) -> TrainConfig:
        """Check every value; a bad one raises :class:`ConfigError` naming the flag, the value and what is allowed.

        ``train()`` calls this first, so the command line and the Python API fail the same way, before any work.
        """
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        for name, (check, allowed) in _RULES.items():
            value = getattr(self, name)
            if not check(value):
                raise ConfigError(f"--{name} {value!r} is not allowed: expected {allowed}")
        total = self.validation_percentage + self.testing_percentage
        if total >= 100:
            raise ConfigError(
                f"--validation_percentage {self.validation_percentage:g} + --testing_percentage "
                f"{self.testing_percentage:g} = {total:g} leaves no images for training: the sum must be below 100"
            )
        if self.multi_label or self.labels_file:
            _check_multi_label(self)
        from retrain.backbones import get_backbone

        get_backbone(
            self.tfhub_module or self.architecture
        )  # an unknown name: a message listing the known ones
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def _check_multi_label(cfg: TrainConfig) -> None:
    """The settings a multi-label run cannot take (yet), each refused with what to do instead."""
    refused = {
        "fine_tune": "fine-tuning is not available for multi-label models yet; run without --fine_tune",
        "resume": "--resume is not available for multi-label runs yet (the head trains in seconds: run again)",
        "engine": "--engine ray is not available for multi-label runs yet; use --engine local",
        "extraction_precision": "--extraction_precision int8 is not available for multi-label runs yet; "
        "train in float32 and export with --quantize int8",
    }
    for name, why in refused.items():
        if getattr(cfg, name) != getattr(TrainConfig, name):
            raise ConfigError(f"--multi_label: {why}")


def _check_type(name: str, value: object, annotation: str) -> None:
    """The Python API can pass anything; the command line's parser already converted each flag."""
    kinds = {
        "str": (str,),
        "bool": (bool,),
        "int": (numbers.Integral,),
        "float": (numbers.Real,),
        "int | None": (numbers.Integral, type(None)),
        "float | None": (numbers.Real, type(None)),
        "str | int": (str, numbers.Integral),
    }
    expected = kinds[annotation]
    if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
        what = {
            "str": "text",
            "bool": "True or False",
            "int": "a whole number",
            "float": "a number",
            "int | None": "a whole number or None",
            "float | None": "a number or None",
            "str | int": "a whole number or text",
        }[annotation]
        raise ConfigError(f"--{name} {value!r} is not allowed: expected {what}, got {type(value).__name__}")


def _percentage(x: float) -> bool:
    return math.isfinite(x) and 0 <= x < 100


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def _one_of(*choices: str) -> tuple:
    return (lambda v: v in choices), "one of " + ", ".join(repr(c) for c in choices)


def _blocks(value: str | int) -> bool:
    text = str(value).strip().lower()
    return text == "all" or (text.isdigit() and int(text) >= 1)


# Field -> (check, what is allowed). Fields not listed take any value of their type (paths, names).
_RULES = {
    "testing_percentage": (_percentage, "a percentage between 0 and 100 (100 excluded)"),
    "validation_percentage": (_percentage, "a percentage between 0 and 100 (100 excluded)"),
    "how_many_training_steps": ((lambda n: n >= 1), "a whole number of at least 1"),
    "learning_rate": (_positive, "a number above 0 (e.g. 0.01)"),
    "train_batch_size": ((lambda n: n >= 1), "a whole number of at least 1"),
    "eval_step_interval": ((lambda n: n >= 1), "a whole number of at least 1"),
    "validation_batch_size": ((lambda n: n == -1 or n >= 1), "-1 (all validation images) or at least 1"),
    "test_batch_size": ((lambda n: n == -1 or n >= 1), "-1 (all test images) or at least 1"),
    "optimizer": _one_of("adam", "sgd", "momentum"),
    "weight_decay": (
        (lambda x: x is None or (math.isfinite(x) and x >= 0)),
        "None (chosen by the cross-fit) or a number of at least 0",
    ),
    "class_balance": _one_of("sample", "weight", "none"),
    "head_solver": _one_of("lbfgs", "steps"),
    "final_fit": _one_of("train", "train+val", "all"),
    "seed": ((lambda n: n is None or 0 <= n < 2**31), "None (random) or a whole number from 0 to 2147483647"),
    "random_crop": ((lambda x: math.isfinite(x) and x >= 0), "a percentage of at least 0"),
    "random_scale": ((lambda x: math.isfinite(x) and x >= 0), "a percentage of at least 0"),
    "random_brightness": ((lambda x: math.isfinite(x) and 0 <= x <= 100), "a percentage from 0 to 100"),
    "distorted_copies": ((lambda n: n >= 0), "a whole number of at least 0 (0 = automatic)"),
    "fine_tune_blocks": (_blocks, "'all' or a number of blocks of at least 1"),
    "fine_tune_epochs": ((lambda n: n >= 1), "a whole number of at least 1"),
    "fine_tune_learning_rate": (_positive, "a number above 0 (e.g. 0.0001)"),
    "fine_tune_patience": ((lambda n: n >= 1), "a whole number of at least 1"),
    "quality": _one_of("default", "best"),
    "intermediate_store_frequency": ((lambda n: n >= 0), "a whole number of at least 0 (0 = never)"),
    "final_tensor_name": (
        (lambda s: bool(s.strip()) and s != "image"),
        "a non-empty name other than 'image' (the model's input)",
    ),
    "quantize": _one_of("", "int8", "fp16"),
    "device": _one_of("auto", "cpu", "cuda"),
    "batch_size": ((lambda n: n >= 0), "a whole number of at least 0 (0 = automatic)"),
    "num_workers": ((lambda n: n >= 0), "a whole number of at least 0 (0 = automatic)"),
    "calibration": _one_of("temperature", "none"),
    "unknown_threshold": ((lambda x: x is None or math.isfinite(x)), "None (automatic) or a finite number"),
    "multi_label_threshold": (
        (lambda x: x is None or (math.isfinite(x) and 0 < x < 1)),
        "None (tuned per label) or a probability between 0 and 1 (both excluded)",
    ),
    "engine": _one_of("local", "ray"),
    "extraction_precision": _one_of("float32", "int8"),
    "logging_verbosity": _one_of("DEBUG", "INFO", "WARN", "WARNING", "ERROR", "FATAL", "CRITICAL"),
}
