"""Errors a user can act on: each names the value, the source and the fix."""

from __future__ import annotations


class DistilrayError(Exception):
    """Base class: the CLI prints these as one line instead of a traceback."""


class ConfigError(DistilrayError):
    """Invalid configuration; carries every problem found, not only the first."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class DataError(DistilrayError):
    """A dataset that cannot be read or does not have the expected shape."""


class ModelError(DistilrayError):
    """A model that cannot be resolved, downloaded, verified or converted."""


class CheckpointError(DistilrayError):
    """A checkpoint directory that is missing files or cannot be loaded."""


class ClusterError(DistilrayError):
    """A Ray cluster that cannot run the requested job (resources, storage, auth)."""


class RunFailed(DistilrayError):
    """A run that started and failed (the CLI exits 1; input problems exit 2)."""


class BundleError(CheckpointError):
    """A model bundle or store entry that is missing, unreadable or does not match its manifest."""


class PromotionRefused(RunFailed):
    """The promotion gate refused a version: each failed bar names both numbers."""

    def __init__(self, failures: list[str]):
        self.failures = list(failures)
        super().__init__("promotion refused, nothing changed: " + "; ".join(self.failures))


class StorageError(RunFailed, OSError):
    """A write the storage refused (disk full, read-only, over quota); names the path.

    An OSError too, so callers that handle file errors keep handling it.
    """
