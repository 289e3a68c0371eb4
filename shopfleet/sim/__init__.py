"""Everything simulated, kept out of the production packages.

``edge_agent``, ``fleet_controller``, ``vision`` and ``hardware`` know nothing of simulation; the
demo, the fleet-scale tests and the rollout benchmark plug these in through the same seams a real
deployment uses:

* :mod:`.cluster`: :class:`~.cluster.SimulatedCluster`, a ``ClusterClient`` handed to the agent's
  apply plug-in (``edge_agent.apply.plugin.attach(agent, config, client=...)``), whose pipelines
  misbehave on the releases or images its own ``faults`` name;
* :mod:`.fleet`: :class:`~.fleet.SimulatedFleet`, hundreds of shops over a real broker;
* :mod:`.camera`: :class:`~.camera.SimulatedCamera`, a door camera pipeline that reports its gate
  metrics through the agent's sink like the real vision pipeline;
* :mod:`.shelf`: :class:`~.shelf.ShelfBoard`, a simulated sensor board on a pseudo-terminal read
  by the real hardware pipeline;
* :mod:`.users`: the demo's logins, created with fresh random passwords.
"""
