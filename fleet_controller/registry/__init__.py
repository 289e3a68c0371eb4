"""The fleet registry: schema (models, migrations, engine), the writer-side store, and typed read models.

Everything else in the controller reads the registry through :mod:`fleet_controller.registry.read`
and writes it only through the single writer (:class:`fleet_controller.intake.core.RegistryWriter`),
which runs :class:`fleet_controller.registry.store.RegistryStore`.
"""
