"""Fusion: shopper sessions, carts and receipts from vision tracks and shelf weight changes.

The model (``fusion.types``, ``fusion.layout``, ``fusion.engine``) takes plain typed values and
imports nothing of the project but ``shopfleet.errors``; the scenario harness (``fusion.scenario``,
``fusion.generate``, ``fusion.sim``, ``fusion.evaluate``, ``fusion.cli``) drives it from the real
``vision`` tracker and the real ``hardware`` event code. See docs/fusion.md.
"""
