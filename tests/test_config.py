"""Every setting is checked before any work: a bad value is exit 2 (CLI) or ConfigError (Python) naming it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import retrain
from retrain.cli import retrain_main
from retrain.config import _RULES, TrainConfig
from retrain.errors import ConfigError, RetrainError

# (flag, bad value as typed, words the message must hold besides the flag and the value)
BAD_FLAGS = [
    ("how_many_training_steps", "0", "at least 1"),
    ("how_many_training_steps", "-5", "at least 1"),
    ("learning_rate", "0", "above 0"),
    ("learning_rate", "-0.1", "above 0"),
    ("learning_rate", "nan", "above 0"),
    ("learning_rate", "inf", "above 0"),
    ("train_batch_size", "0", "at least 1"),
    ("eval_step_interval", "0", "at least 1"),
    ("validation_batch_size", "0", "-1 (all validation images) or at least 1"),
    ("validation_batch_size", "-2", "-1 (all validation images)"),
    ("test_batch_size", "0", "-1 (all test images)"),
    ("testing_percentage", "-1", "between 0 and 100"),
    ("validation_percentage", "-0.5", "between 0 and 100"),
    ("testing_percentage", "100", "between 0 and 100"),
    ("weight_decay", "-1", "at least 0"),
    ("seed", "-1", "from 0 to 2147483647"),
    ("random_crop", "-5", "at least 0"),
    ("random_scale", "-1", "at least 0"),
    ("random_brightness", "101", "from 0 to 100"),
    ("distorted_copies", "-1", "at least 0"),
    ("fine_tune_blocks", "0", "'all' or a number"),
    ("fine_tune_blocks", "top", "'all' or a number"),
    ("fine_tune_epochs", "0", "at least 1"),
    ("fine_tune_learning_rate", "0", "above 0"),
    ("fine_tune_patience", "0", "at least 1"),
    ("intermediate_store_frequency", "-1", "at least 0"),
    ("final_tensor_name", "", "non-empty name"),
    ("final_tensor_name", "image", "other than 'image'"),
    ("batch_size", "-1", "at least 0"),
    ("num_workers", "-2", "at least 0"),
]


@pytest.mark.parametrize(("flag", "value", "allowed"), BAD_FLAGS, ids=[f"{f}={v}" for f, v, _ in BAD_FLAGS])
def test_bad_flag_value_is_exit_2_naming_flag_value_and_allowed(tmp_path: Path, capsys, flag, value, allowed):
    # Checked before discovery: the image folder need not even exist.
    code = retrain_main(
        ["--image_dir", str(tmp_path / "none"), "--output_dir", str(tmp_path / "o"), f"--{flag}={value}"]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"--{flag}" in err and allowed in err and "internal error" not in err, err
    shown = repr(float(value)) if flag in ("learning_rate",) else value
    assert shown.strip("'") in err or repr(value) in err, err
    assert not (tmp_path / "o").exists()  # no run folder is left behind


@pytest.mark.parametrize(("valid", "testing"), [(50, 50), (60, 45), (99.5, 0.5)])
def test_percentages_summing_to_100_or_more_are_refused(tmp_path: Path, capsys, valid, testing):
    code = retrain_main(
        ["--image_dir", str(tmp_path), f"--validation_percentage={valid}", f"--testing_percentage={testing}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--validation_percentage" in err and "--testing_percentage" in err
    assert "below 100" in err and f"{valid + testing:g}" in err


def test_python_api_gets_the_same_error_before_any_work(tmp_path: Path):
    with pytest.raises(
        ConfigError, match=r"--how_many_training_steps 0 is not allowed: expected a whole number"
    ):
        retrain.train(tmp_path / "missing", how_many_training_steps=0)
    with pytest.raises(ConfigError, match=r"--train_batch_size '10' is not allowed: expected a whole number"):
        retrain.train(tmp_path / "missing", train_batch_size="10")
    with pytest.raises(ConfigError, match=r"--fine_tune 1 is not allowed: expected True or False"):
        retrain.train(tmp_path / "missing", fine_tune=1)
    with pytest.raises(
        ConfigError, match=r"--optimizer 'adamw' is not allowed: expected one of 'adam', 'sgd'"
    ):
        retrain.train(tmp_path / "missing", optimizer="adamw")
    with pytest.raises(RetrainError, match="unknown backbone"):
        TrainConfig(architecture="resnet_9000").validate()


def test_defaults_and_the_extremes_that_are_allowed_pass():
    TrainConfig().validate()
    TrainConfig(
        testing_percentage=0,
        validation_percentage=0,
        seed=0,
        validation_batch_size=-1,
        test_batch_size=1,
        random_brightness=100,
        random_crop=150,
        fine_tune_blocks="ALL",
        fine_tune_epochs=2,
        quantize="int8",
        logging_verbosity="WARN",
    ).validate()
    TrainConfig(
        how_many_training_steps=True.__int__(), learning_rate=1
    ).validate()  # an int where a float goes


def test_fine_tune_blocks_takes_a_number_from_python_too():
    TrainConfig(fine_tune_blocks=2).validate()
    with pytest.raises(ConfigError, match=r"--fine_tune_blocks 0 is not allowed"):
        TrainConfig(fine_tune_blocks=0).validate()


def test_every_field_has_a_type_check_and_every_rule_names_a_field():
    names = set(TrainConfig.field_names())
    assert set(_RULES) <= names
    for f in dataclasses.fields(TrainConfig):  # a value of another type is refused for every field
        wrong = object()
        with pytest.raises(ConfigError, match=f"--{f.name} "):
            dataclasses.replace(TrainConfig(), **{f.name: wrong}).validate()
