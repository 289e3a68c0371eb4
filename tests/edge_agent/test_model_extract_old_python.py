"""Model archives extract on Python without tarfile filters (Debian bookworm's 3.11.2, the images' base and a fresh Debian machine's).

Found by the container tier: the vision image's model-stage failed with ``extractall() got an
unexpected keyword argument 'filter'``. Without filters the extraction refuses escaping names itself.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from edge_agent.apply.model_fetch import ModelRejected, _extract


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def no_filters(monkeypatch):
    monkeypatch.delattr(tarfile, "data_filter", raising=False)


def test_a_package_extracts_without_filters(tmp_path: Path, no_filters):
    archive = _tar(tmp_path / "p.tar", {"model.json": b"{}", "model.onnx": b"x" * 10})
    _extract(archive, tmp_path / "out", 1 << 20)
    assert (tmp_path / "out/model.onnx").read_bytes() == b"x" * 10


@pytest.mark.parametrize("name", ["../evil", "/etc/evil", "a/../../evil"])
def test_escaping_names_are_refused_without_filters(tmp_path: Path, no_filters, name: str):
    archive = _tar(tmp_path / "p.tar", {name: b"x"})
    with pytest.raises(ModelRejected, match="outside the package"):
        _extract(archive, tmp_path / "out", 1 << 20)
    assert not (tmp_path / "evil").exists()


def test_the_controllers_upload_extracts_without_filters_and_refuses_escaping_names(tmp_path: Path, no_filters):
    # The controller's model upload (fleet_controller.rollout.models_store) shares the extraction:
    # on a fresh Debian machine's Python 3.11.2 it answered 500 to every upload.
    from fleet_controller.rollout.models_store import ModelStoreError, extract_archive

    good = _tar(tmp_path / "good.tar", {"model.json": b"{}", "model.onnx": b"y" * 5})
    with good.open("rb") as src:
        extract_archive(src, tmp_path / "pkg")
    assert (tmp_path / "pkg/model.onnx").read_bytes() == b"y" * 5
    bad = _tar(tmp_path / "bad.tar", {"../evil": b"x"})
    with bad.open("rb") as src, pytest.raises(ModelStoreError, match="outside the directory"):
        extract_archive(src, tmp_path / "pkg2")
    assert not (tmp_path / "evil").exists()
