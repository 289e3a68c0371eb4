"""Apply a shop's signed desired state to its K3s cluster and report what happened.

The controller publishes one retained, signed :class:`~edge_agent.protocol.DesiredState` per
shop. One agent per shop (``apply.enabled`` in its config) turns it
into cluster changes, in four steps that are separate on purpose:

1. :mod:`.verify` refuses anything unsigned, forged, for another shop, or older than the revision
   it already applied (replay), remembering the last applied revision on disk;
2. :func:`.diff.diff` decides, as a pure function of desired and live objects, what to apply and
   what to prune, and :func:`.diff.readiness` when an applied object is ready;
3. a :class:`.cluster.ClusterClient` does the I/O: :class:`.kube.KubernetesClusterClient` on a
   real cluster, :class:`.cluster.InMemoryClusterClient` in tests, or any client passed to
   :func:`.plugin.attach`;
4. :class:`.handler.DesiredStateHandler` runs the steps (dry run of the whole set, foundations,
   the rest, wait, prune; retries while the cluster is unavailable; resume and drift correction)
   and reports a :class:`~edge_agent.protocol.ReportedState` with per-object status through the
   agent's outbox.

docs/apply.md describes the order of an apply and why, the retries, the config and the metrics.
"""
