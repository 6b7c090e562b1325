"""Ray launcher for ``nsa-train``: an embedded local Ray or an existing cluster, via Ray Train."""
from .ray_job import RayJob

__all__ = ["RayJob"]
