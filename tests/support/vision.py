"""What the vision tests share about their real media: the clip length and zones drawn for vtest.avi."""

from __future__ import annotations

from pathlib import Path

CLIP_FRAMES = 80  # 8 s of vtest.avi: four people walk in from the right, one lingers mid-plaza

# Hand-drawn for vtest.avi (768x576): a vertical door line at x=650 walked across right-to-left
# by people arriving from the road, and a "shelf" rectangle in the middle of the plaza.
PLAZA_ZONES = {
    "camera": "plaza",
    "door": {"a": [650, 250], "b": [650, 520], "enter_from": "left"},
    "shelves": [{"name": "shelf-1", "polygon": [[350, 200], [560, 200], [560, 330], [350, 330]], "dwell_seconds": 2.0}],
}


def plaza_floor_files(d: Path, publishers: dict) -> tuple[Path, Path]:
    """Write the floor view's zones (the plaza's, drawn in floor pixels) and a one-slot shop layout of the plaza under ``d``.

    The floor pipelines of these tests merge with ``px_per_m`` 100 and origin (0, 0), which makes
    the floor's pixels camera a's: the plaza's door line (x = 6.5 m, walked across right to left)
    and shelf (3.5-5.6 m x 2.0-3.3 m) are drawn with the same numbers. ``publishers`` is the
    layout's binding of fusion's events to nodes. Return (zones, layout).
    """
    import yaml

    top = d / "zones-floor.yaml"
    top.write_text(yaml.safe_dump({**PLAZA_ZONES, "camera": "floor", "anchor": "center"}))
    layout = d / "layout.yaml"
    layout.write_text(yaml.safe_dump({
        "name": "plaza", "width_m": 8, "depth_m": 6, "door": {"a": [6.5, 2.5], "b": [6.5, 5.2], "inside": [5.0, 3.5]},
        "slots": [{"slot": "A1", "shelf": "shelf-1", "board": "b1", "channel": 0, "product": "cola", "unit_weight_g": 345, "price_cents": 150,
                   "front": [4.5, 2.0], "facing": [0, 1]}],
        "publishers": publishers,
    }))
    return top, layout


def clip_assets(d: Path, frames: int, zones: dict) -> dict[str, str]:
    """Write a zones file and a full-size clip of vtest.avi's first ``frames`` frames under ``d``; return them with the model package.

    The model and the clip come from the local cache (``vision.model.cache_root``), never a download.
    """
    import cv2
    import yaml

    from vision.fixtures import fetch_fixture
    from vision.model import cache_root, fetch_model

    cache = cache_root()
    pkg = fetch_model("yolov4-tiny", cache)
    src = cv2.VideoCapture(str(fetch_fixture("vtest.avi", cache / "fixtures", cache)))
    w = cv2.VideoWriter(str(d / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (768, 576))
    for _ in range(frames):
        w.write(src.read()[1])
    w.release()
    src.release()
    (d / "zones.yaml").write_text(yaml.safe_dump(zones))
    return {"model": str(pkg.path), "zones": str(d / "zones.yaml"), "clip": str(d / "clip.avi")}
