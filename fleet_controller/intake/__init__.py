"""MQTT in: the controller's broker adapter, the batching intake, dedupe, and the single registry writer.

Data flows one way through the controller: ``intake`` (this package) -> ``registry`` (schema,
writer-side store, read models) -> ``rollout`` and ``alerts`` (decisions on what the registry
holds) -> ``web`` (API and dashboard); ``fleet_controller.service`` wires them together.
"""
