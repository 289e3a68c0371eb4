"""Convert a Darknet YOLO network (cfg + weights) to ONNX with numpy and ``onnx.helper``.

Why our own converter: the network is small (convolutions with batch norm, leaky ReLU, route
with channel groups, max-pool, upsample, YOLO heads), the public converters pull in PyTorch or
TensorFlow, and OpenCV 5 dropped its Darknet importer. Parsing and weight loading are pure
functions over text and bytes; ``build_onnx`` returns an in-memory ``onnx.ModelProto``.

Choices that matter for correctness (they mirror darknet's own code):
- batch norm is folded into the convolution with darknet's epsilon placement,
  ``scale / (sqrt(var) + 1e-6)``, not ``sqrt(var + eps)``;
- ``[maxpool]`` pads ``size - 1`` pixels in total, ``(size - 1) // 2`` before;
- ``[route] groups=G group_id=I`` takes the I-th of G equal channel slices;
- the YOLO heads are left raw (N, A*(5+C), H, W); decoding is done by the detector in numpy, so
  ``scale_x_y`` and anchors live in ``model.json`` where a reader can see them.
"""

from __future__ import annotations

import builtins
import re
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from vision.errors import ConversionError

BN_EPS = 1e-6
LEAKY_SLOPE = 0.1
SUPPORTED = {"net", "convolutional", "route", "maxpool", "upsample", "yolo", "shortcut"}


@dataclass(frozen=True)
class Section:
    """One ``[type]`` block of a cfg file with its key/value options (values as text)."""

    type: str
    options: dict[str, str] = field(default_factory=dict)
    line: int = 0

    def int(self, key: str, default: int | None = None) -> int:
        """Return option ``key`` as an int (or ``default``), naming the line when it is bad."""
        raw = self.options.get(key)
        if raw is None:
            if default is None:
                raise ConversionError("cfg-missing-key", f"cfg line {self.line}: [{self.type}] needs '{key}'")
            return default
        try:
            return int(raw)
        except ValueError:
            raise ConversionError("cfg-bad-value", f"cfg line {self.line}: [{self.type}] {key}={raw!r} is not an integer") from None

    def ints(self, key: str) -> list[builtins.int]:
        """Return a comma-separated integer option as a list."""
        raw = self.options.get(key, "")
        try:
            return [int(v) for v in raw.split(",") if v.strip()]
        except ValueError:
            raise ConversionError("cfg-bad-value", f"cfg line {self.line}: [{self.type}] {key}={raw!r} is not a list of integers") from None

    def floats(self, key: str) -> list[float]:
        """Return a comma-separated float option as a list."""
        raw = self.options.get(key, "")
        try:
            return [float(v) for v in raw.split(",") if v.strip()]
        except ValueError:
            raise ConversionError("cfg-bad-value", f"cfg line {self.line}: [{self.type}] {key}={raw!r} is not a list of numbers") from None


def parse_cfg(text: str) -> list[Section]:
    """Parse Darknet cfg text into sections; the first must be ``[net]``."""
    sections: list[Section] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"\[([A-Za-z_]+)\]", line)
        if m:
            kind = m.group(1).lower()
            if kind not in SUPPORTED:
                raise ConversionError("cfg-unsupported-layer", f"cfg line {lineno}: layer [{kind}] is not supported (supported: {sorted(SUPPORTED)})")
            sections.append(Section(kind, {}, lineno))
            continue
        if "=" not in line or not sections:
            raise ConversionError("cfg-syntax", f"cfg line {lineno}: expected '[section]' or 'key=value', got {raw.strip()[:60]!r}")
        key, value = (s.strip() for s in line.split("=", 1))
        sections[-1].options[key] = value
    if not sections or sections[0].type != "net":
        raise ConversionError("cfg-syntax", "cfg must start with a [net] section")
    if len(sections) == 1:
        raise ConversionError("cfg-syntax", "cfg has no layers after [net]")
    return sections


@dataclass(frozen=True)
class YoloHead:
    """What the detector needs to decode one raw YOLO output."""

    output: str
    anchors: list[list[float]]
    classes: int
    stride: int
    scale_x_y: float


@dataclass
class _Tensor:
    name: str
    channels: int
    height: int
    width: int


def _read_header(buf: bytes) -> int:
    """Return the byte offset where the weights start, after darknet's version header."""
    if len(buf) < 20:
        raise ConversionError("weights-truncated", f"weights file is {len(buf)} bytes, too short for a darknet header")
    major, minor, _rev = np.frombuffer(buf[:12], dtype="<i4")
    return 20 if major * 10 + minor >= 2 else 16


def build_onnx(cfg_text: str, weights: bytes, *, opset: int = 13) -> tuple[onnx.ModelProto, list[YoloHead]]:
    """Build an ONNX model with a dynamic batch from a cfg and its weights; return it and its heads."""
    sections = parse_cfg(cfg_text)
    net = sections[0]
    width, height, channels = net.int("width"), net.int("height"), net.int("channels", 3)
    offset = _read_header(weights)
    data = np.frombuffer(weights, dtype="<f4", offset=offset, count=(len(weights) - offset) // 4)
    pos = 0

    def take(n: int, what: str) -> np.ndarray:
        nonlocal pos
        if pos + n > data.size:
            raise ConversionError("weights-truncated", f"weights end at float {data.size} while reading {what}; the weights do not match the cfg")
        out = data[pos : pos + n]
        pos += n
        return out

    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    outputs: list[tuple[_Tensor, Section]] = []
    layers: list[_Tensor] = []
    prev = _Tensor("images", channels, height, width)

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr, name))
        return name

    for idx, sec in enumerate(sections[1:]):
        name = f"l{idx:03d}_{sec.type}"
        if sec.type == "convolutional":
            filters, size, stride = sec.int("filters"), sec.int("size"), sec.int("stride", 1)
            pad = size // 2 if sec.int("pad", 0) else sec.int("padding", 0)
            groups = sec.int("groups", 1)
            bn = sec.int("batch_normalize", 0)
            cin = prev.channels // groups
            bias = take(filters, f"{name} biases").copy()
            if bn:
                scales = take(filters, f"{name} bn scales")
                mean = take(filters, f"{name} bn mean")
                var = take(filters, f"{name} bn variance")
            w = take(filters * cin * size * size, f"{name} weights").reshape(filters, cin, size, size).copy()
            if bn:
                factor = scales / (np.sqrt(var) + BN_EPS)
                w *= factor[:, None, None, None]
                # darknet: y = scale * (conv - mean) / (sqrt(var) + eps) + bias; the conv has no bias of its own
                bias = bias - mean * factor
            nodes.append(
                helper.make_node(
                    "Conv",
                    [prev.name, const(f"{name}.w", w.astype(np.float32)), const(f"{name}.b", bias.astype(np.float32))],
                    [f"{name}.conv"],
                    kernel_shape=[size, size],
                    strides=[stride, stride],
                    pads=[pad, pad, pad, pad],
                    group=groups,
                    name=name,
                )
            )
            out_h = (prev.height + 2 * pad - size) // stride + 1
            out_w = (prev.width + 2 * pad - size) // stride + 1
            act = sec.options.get("activation", "linear")
            if act == "leaky":
                nodes.append(helper.make_node("LeakyRelu", [f"{name}.conv"], [name], alpha=LEAKY_SLOPE, name=f"{name}.act"))
            elif act == "linear":
                nodes.append(helper.make_node("Identity", [f"{name}.conv"], [name], name=f"{name}.act"))
            else:
                raise ConversionError("cfg-unsupported-activation", f"cfg line {sec.line}: activation={act} is not supported (leaky, linear)")
            cur = _Tensor(name, filters, out_h, out_w)
        elif sec.type == "maxpool":
            size, stride = sec.int("size"), sec.int("stride", 1)
            total = sec.int("padding", size - 1)
            before, after = total // 2, total - total // 2
            nodes.append(helper.make_node("MaxPool", [prev.name], [name], kernel_shape=[size, size], strides=[stride, stride], pads=[before, before, after, after], name=name))
            cur = _Tensor(name, prev.channels, (prev.height + total - size) // stride + 1, (prev.width + total - size) // stride + 1)
        elif sec.type == "upsample":
            stride = sec.int("stride", 2)
            scales_name = const(f"{name}.scales", np.array([1, 1, stride, stride], dtype=np.float32))
            nodes.append(helper.make_node("Resize", [prev.name, "", scales_name], [name], mode="nearest", name=name))
            cur = _Tensor(name, prev.channels, prev.height * stride, prev.width * stride)
        elif sec.type == "route":
            refs = [r if r >= 0 else idx + r for r in sec.ints("layers")]
            if not refs or any(r < 0 or r >= idx for r in refs):
                raise ConversionError("cfg-bad-route", f"cfg line {sec.line}: route layers={sec.options.get('layers')} points outside the network")
            srcs = [layers[r] for r in refs]
            groups, gid = sec.int("groups", 1), sec.int("group_id", 0)
            if groups > 1:
                if len(srcs) != 1:
                    raise ConversionError("cfg-bad-route", f"cfg line {sec.line}: grouped route must have one input layer")
                src = srcs[0]
                part = src.channels // groups
                starts = const(f"{name}.starts", np.array([gid * part], dtype=np.int64))
                ends = const(f"{name}.ends", np.array([(gid + 1) * part], dtype=np.int64))
                axes = const(f"{name}.axes", np.array([1], dtype=np.int64))
                nodes.append(helper.make_node("Slice", [src.name, starts, ends, axes], [name], name=name))
                cur = _Tensor(name, part, src.height, src.width)
            elif len(srcs) == 1:
                cur = srcs[0]
            else:
                if len({(s.height, s.width) for s in srcs}) != 1:
                    raise ConversionError("cfg-bad-route", f"cfg line {sec.line}: route joins layers of different sizes {[(s.height, s.width) for s in srcs]}")
                nodes.append(helper.make_node("Concat", [s.name for s in srcs], [name], axis=1, name=name))
                cur = _Tensor(name, sum(s.channels for s in srcs), srcs[0].height, srcs[0].width)
        elif sec.type == "shortcut":
            ref = sec.int("from")
            src = layers[idx + ref if ref < 0 else ref]
            nodes.append(helper.make_node("Add", [prev.name, src.name], [name], name=name))
            cur = _Tensor(name, prev.channels, prev.height, prev.width)
        elif sec.type == "yolo":
            outputs.append((prev, sec))
            cur = prev
        else:  # pragma: no cover - parse_cfg rejects unknown sections
            raise ConversionError("cfg-unsupported-layer", sec.type)
        layers.append(cur)
        prev = cur

    if pos != data.size:
        raise ConversionError("weights-mismatch", f"weights have {data.size - pos} floats left over after the last layer; the weights do not match the cfg")
    if not outputs:
        raise ConversionError("cfg-no-yolo", "cfg has no [yolo] layer, so the model has no detection output")

    heads: list[YoloHead] = []
    graph_outputs = []
    for i, (t, sec) in enumerate(outputs):
        anchors_flat = sec.floats("anchors")
        pairs = [anchors_flat[j : j + 2] for j in range(0, len(anchors_flat), 2)]
        mask = sec.ints("mask") or list(range(len(pairs)))
        classes = sec.int("classes")
        if t.channels != len(mask) * (5 + classes):
            raise ConversionError("cfg-bad-yolo", f"cfg line {sec.line}: head input has {t.channels} channels, expected {len(mask)}*(5+{classes})")
        out = f"head{i}_{t.height}x{t.width}"
        nodes.append(helper.make_node("Identity", [t.name], [out], name=f"{out}.out"))
        graph_outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", t.channels, t.height, t.width]))
        heads.append(YoloHead(out, [pairs[m] for m in mask], classes, height // t.height, float(sec.options.get("scale_x_y", "1"))))

    graph = helper.make_graph(
        nodes,
        "darknet",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", channels, height, width])],
        graph_outputs,
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="shopfleet.vision.darknet")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, heads
