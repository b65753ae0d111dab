"""Versions of installed packages, for manifests and benchmark results. Torch-free."""

from __future__ import annotations

from importlib import metadata


def installed_versions(dists: tuple[str, ...]) -> dict[str, str]:
    """{distribution: version} of those of `dists` that are installed."""
    versions = {}
    for dist in dists:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions
