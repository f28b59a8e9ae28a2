"""Exceptions a user can act on. Each message names the value, the expectation and the fix."""

from __future__ import annotations


class RetrainError(Exception):
    """A problem with the user's input or environment; the CLI prints it without a traceback."""

    exit_code = 2


class ConfigError(RetrainError):
    """A setting (flag or ``train()`` argument) has a value outside what it allows."""


class DatasetError(RetrainError):
    """The image folder cannot be used as asked (too few classes, nothing readable...)."""


class SkippedFilesError(RetrainError):
    """``strict`` mode: some files could not be used."""

    exit_code = 3


class ModelFileError(RetrainError):
    """A model or labels file is missing, unreadable or not one of ours."""
