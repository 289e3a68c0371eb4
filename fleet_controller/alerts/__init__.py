"""Alerts: rules an operator sets in YAML, a pure evaluator, storage, metrics and a webhook.

``rules`` loads and checks the YAML; ``evaluator`` decides, as a pure function over a snapshot
of the registry, which alerts fire now; ``store`` keeps them in SQL (deduplicated by key,
resolved when the condition clears, acknowledged and silenced by operators); ``webhook`` tells
the outside world; ``worker`` ties them together on the controller's loop.
"""
