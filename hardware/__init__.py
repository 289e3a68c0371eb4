"""Shelf sensor boards over USB serial: frame codec, driver, stability detector, events, simulator.

A library with no import of the rest of shopfleet (an import-linter contract enforces it), so the
edge agent, the CLI and the demo all use the same code. Each stage takes and returns one typed
value: frame bytes -> ``SensorFrame`` -> ``Reading`` -> ``ShelfEvent``/``DoorEvent``/
``TemperatureAlert``. See docs/hardware.md and docs/serial-protocol.md.
"""
