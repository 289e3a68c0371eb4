"""Camera frames to shop events: capture, detect (ONNX Runtime), track (ByteTrack), zone events.

A library that imports nothing else of shopfleet, so it can be used, tested and benchmarked on
its own; the edge agent wraps it as the ``type: vision`` pipeline. See docs/vision.md.
"""
