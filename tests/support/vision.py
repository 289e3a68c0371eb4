"""What the vision tests share about their real media: the clip length and zones drawn for vtest.avi."""

from __future__ import annotations

CLIP_FRAMES = 80  # 8 s of vtest.avi: four people walk in from the right, one lingers mid-plaza

# Hand-drawn for vtest.avi (768x576): a vertical door line at x=650 walked across right-to-left
# by people arriving from the road, and a "shelf" rectangle in the middle of the plaza.
PLAZA_ZONES = {
    "camera": "plaza",
    "door": {"a": [650, 250], "b": [650, 520], "enter_from": "left"},
    "shelves": [{"name": "shelf-1", "polygon": [[350, 200], [560, 200], [560, 330], [350, 330]], "dwell_seconds": 2.0}],
}
