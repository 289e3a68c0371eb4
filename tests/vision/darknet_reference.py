"""An independent numpy forward pass of a Darknet network, to check the ONNX converter against.

OpenCV 5 removed its Darknet importer, so the reference is written here straight from darknet's
C code, deliberately unlike the converter: batch norm is applied as a separate step (not folded
into the weights), convolution is im2col + matmul, max-pool and route are plain numpy. It shares
only the cfg parser with the converter (whose own tests cover it).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from vision.darknet import parse_cfg


def _conv(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
    c, _, _ = x.shape
    f, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    win = sliding_window_view(xp, (k, k), axis=(1, 2))[:, ::stride, ::stride]  # (C, OH, OW, k, k)
    oh, ow = win.shape[1:3]
    cols = win.transpose(1, 2, 0, 3, 4).reshape(oh * ow, c * k * k)
    return (cols @ w.reshape(f, -1).T).T.reshape(f, oh, ow)


def forward(cfg_text: str, weights: bytes, image: np.ndarray) -> list[np.ndarray]:
    """Run one CHW float image through the network; return the inputs of each [yolo] layer."""
    sections = parse_cfg(cfg_text)
    major, minor = np.frombuffer(weights[:8], "<i4")
    data = np.frombuffer(weights, "<f4", offset=20 if major * 10 + minor >= 2 else 16)
    pos = 0
    outs: list[np.ndarray] = []
    layers: list[np.ndarray] = []
    x = image.astype(np.float64)
    for i, s in enumerate(sections[1:]):
        o = s.options
        if s.type == "convolutional":
            f, k, st = int(o["filters"]), int(o["size"]), int(o.get("stride", 1))
            c = x.shape[0]
            b = data[pos : pos + f]
            pos += f
            bn = int(o.get("batch_normalize", 0))
            if bn:
                scale, mean, var = (data[pos + j * f : pos + (j + 1) * f].astype(np.float64) for j in range(3))
                pos += 3 * f
            w = data[pos : pos + f * c * k * k].reshape(f, c, k, k).astype(np.float64)
            pos += f * c * k * k
            y = _conv(x, w, st, k // 2 if int(o.get("pad", 0)) else 0)
            if bn:
                y = (y - mean[:, None, None]) / (np.sqrt(var)[:, None, None] + 0.000001)
                y = y * scale[:, None, None]
            y = y + b[:, None, None]
            if o.get("activation") == "leaky":
                y = np.where(y > 0, y, 0.1 * y)
            x = y
        elif s.type == "maxpool":
            k, st = int(o["size"]), int(o.get("stride", 1))
            p = k - 1
            xp = np.pad(x, ((0, 0), (p // 2, p - p // 2), (p // 2, p - p // 2)), constant_values=-np.inf)
            x = sliding_window_view(xp, (k, k), axis=(1, 2))[:, ::st, ::st].max(axis=(3, 4))
        elif s.type == "upsample":
            st = int(o.get("stride", 2))
            x = x.repeat(st, axis=1).repeat(st, axis=2)
        elif s.type == "route":
            refs = [int(r) for r in o["layers"].split(",")]
            srcs = [layers[r if r >= 0 else i + r] for r in refs]
            g, gid = int(o.get("groups", 1)), int(o.get("group_id", 0))
            if g > 1:
                n = srcs[0].shape[0] // g
                x = srcs[0][gid * n : (gid + 1) * n]
            else:
                x = np.concatenate(srcs, axis=0)
        elif s.type == "yolo":
            outs.append(x)
        layers.append(x)
    assert pos == data.size, "reference consumed a different number of weights"
    return outs
