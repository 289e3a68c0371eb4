"""The container tier: shopfleet's images run with podman from a shop's rendered manifests.

Tests marked ``containers`` need podman and buildah (and the images of ``make images``); they
skip, saying which is missing, on a machine without them. The translator's own tests
(test_podman_translate.py) are pure and always run.
"""

from __future__ import annotations

import shutil

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "containers: runs podman containers of the built images (make images first)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = [t for t in ("podman", "buildah") if not shutil.which(t)]
    if not missing:
        return
    skip = pytest.mark.skip(reason=f"needs {' and '.join(missing)} (apt-get install podman buildah)")
    for item in items:
        if "containers" in item.keywords:
            item.add_marker(skip)
