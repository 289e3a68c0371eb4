"""Apply a shop's signed desired state to its K3s cluster and report what happened.

The controller publishes one retained, signed :class:`~edge_agent.protocol.DesiredState` per
shop (ARCHITECTURE.md decision 1). One agent per shop (``apply.enabled`` in its config) turns it
into cluster changes, in four steps that are separate on purpose:

1. :mod:`.verify` refuses anything unsigned, forged, for another shop, or older than the revision
   it already applied (replay), remembering the last applied revision on disk;
2. :func:`.diff.diff` decides, as a pure function of desired and live objects, what to apply and
   what to prune;
3. a :class:`.cluster.ClusterClient` does the I/O: :class:`.kube.KubernetesClusterClient` on a
   real cluster, :class:`.cluster.InMemoryClusterClient` in tests, or any client passed to
   :func:`.plugin.attach`;
4. :class:`.handler.DesiredStateHandler` runs the steps and reports a
   :class:`~edge_agent.protocol.ReportedState` with per-object status through the agent's outbox.
"""
