"""One typed config for a training run. The CLI only overrides these defaults.

Field names are retrain.py's flag names, so ``--how_many_training_steps 500`` on the
command line and ``train(..., how_many_training_steps=500)`` in Python mean the same.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path


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
    weight_decay: float = 0.0
    class_balance: str = "sample"
    seed: int | None = None
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
    fine_tune_blocks: str = "3"
    fine_tune_epochs: int = 10
    fine_tune_learning_rate: float = 1e-4
    fine_tune_patience: int = 3
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
    # -- running -------------------------------------------------------------------------------
    device: str = "auto"
    batch_size: int = 0  # images per forward pass; 0 = automatic (the engine's batch_size, engines.AUTO_BATCH)
    num_workers: int = 0  # decode threads; 0 = automatic
    strict: bool = False
    quiet: bool = False
    logging_verbosity: str = "INFO"

    @property
    def pixel_batch_size(self) -> int:
        """Images per forward pass for distortions and fine-tuning: ``batch_size``, or 32 when automatic."""
        return self.batch_size or 32

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]
