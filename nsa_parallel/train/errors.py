"""The one exception for failures that the same command would repeat."""
from __future__ import annotations


class JobError(ValueError):
    """A deterministic failure: the config, the data, a checkpoint or the shapes they imply are wrong,
    or training diverged. Retrying cannot help, so neither Ray nor ``nsa-train`` retries it; it ends
    the run with its message and exit status 2. (A ``ValueError``, as the config checks raise.)"""
