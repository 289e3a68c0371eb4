"""Plug the apply path into the node agent: the ``apply:`` config section and :func:`attach`.

Only one node per shop applies (the one whose config says ``apply.enabled: true``, usually the K3s
server node); every other node ignores desired states. :func:`attach` builds the verifier from the
trusted public keys, the revision store and the cluster client (Kubernetes, or any
:class:`~edge_agent.apply.cluster.ClusterClient` the caller passes in: in-memory clusters in tests
and other clients come in through that seam, not through the config), registers the handler on
the agent, whose outbox carries each ``ReportedState`` (retained) to the controller, and starts
the reconciler thread: it resumes an apply a previous process left unfinished (the agent replaced
its own pod, or restarted) and, every ``drift_interval_s``, corrects drift. docs/apply.md
describes every key.

The config model is all the agent's config loader imports from here; the handler, the verifier
and with them ``cryptography`` are imported by :func:`attach` only, so an agent with apply
disabled never loads them.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge_agent.apply.diff import ObjectRef
from edge_agent.apply.model_fetch import ModelsConfig

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from edge_agent.apply.cluster import ClusterClient
    from edge_agent.apply.handler import ApplyReport, DesiredStateHandler
    from edge_agent.host import AgentHost


class ApplyConfig(BaseModel):
    """The ``apply:`` section of the agent config: whether and how this node applies desired state."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = Field(False, description="Apply the shop's desired state from this node (one node per shop, usually the K3s server).")
    public_keys: tuple[Path, ...] = Field((), description="PEM ed25519 public key file(s) of the controller; several during a key rotation.")
    state_path: Path = Field(Path("/var/lib/shopfleet/applied.json"), description="File keeping the last applied revision (replay protection).")
    cluster: Literal["kubernetes"] = Field("kubernetes", description="'kubernetes' applies to the shop's K3s (the only cluster a config can name).")
    kubeconfig: Path | None = Field(None, description="kubeconfig file; when set it wins over the in-cluster service account (unset: in-cluster, then $KUBECONFIG or ~/.kube/config).")
    ready_timeout_s: float = Field(300.0, gt=0, description="Longest wait for DaemonSets/Deployments to be updated and ready before reporting failed.")
    poll_interval_s: float = Field(2.0, gt=0, description="Seconds between readiness checks; lower reports sooner, costs API calls.")
    request_timeout_s: float = Field(30.0, gt=0, description="Timeout of one Kubernetes API request; a timeout is retried like a 5xx.")
    retry_deadline_s: float = Field(600.0, gt=0, description="How long one apply retries an unavailable cluster API (429, 5xx, timeouts) before it is left 'retrying' for the reconciler.")
    retry_min_s: float = Field(1.0, gt=0, description="First retry delay; doubled per attempt up to retry_max_s, with jitter. A Retry-After header overrides it.")
    retry_max_s: float = Field(30.0, gt=0, description="Longest delay between two retries.")
    drift_interval_s: float = Field(300.0, ge=0, description="Seconds between drift checks (and resumes of unfinished applies); 0 turns the reconciler off.")
    self_daemonset: str = Field("shopfleet/shopfleet-agent", pattern=r"^[a-z0-9-]+/[a-z0-9.-]+$",
                                description="namespace/name of the agent's own DaemonSet: applied last, never pruned.")
    models: ModelsConfig = Field(default_factory=ModelsConfig, description="Model packages: source, node-local directory, bandwidth limit (docs/models.md).")

    @model_validator(mode="after")
    def _keys(self) -> ApplyConfig:
        if self.enabled and not self.public_keys:
            raise ValueError("apply.enabled needs apply.public_keys: copy the controller's .pub file (shopfleet release keygen) to the node")
        if self.retry_min_s > self.retry_max_s:
            raise ValueError(f"apply.retry_min_s ({self.retry_min_s}) is above apply.retry_max_s ({self.retry_max_s}): lower retry_min_s")
        return self

    @property
    def self_ref(self) -> ObjectRef:
        """Return the ref of the agent's own DaemonSet."""
        namespace, name = self.self_daemonset.split("/", 1)
        return ObjectRef("apps/v1", "DaemonSet", namespace, name)


def make_client(config: ApplyConfig) -> ClusterClient:
    """Return the cluster client ``config.cluster`` names."""
    from edge_agent.apply.kube import KubernetesClusterClient

    return KubernetesClusterClient(kubeconfig=str(config.kubeconfig) if config.kubeconfig else None, request_timeout_s=config.request_timeout_s)


def attach(
    agent: AgentHost, config: ApplyConfig, client: ClusterClient | None = None, stop: threading.Event | None = None
) -> DesiredStateHandler | None:
    """Register a desired-state handler on ``agent`` if ``config.enabled``; return it (None when disabled).

    ``client`` replaces the Kubernetes client ``config`` names (e.g. an in-memory cluster). Unless
    ``drift_interval_s`` is 0, a daemon thread runs the handler's reconciler until ``stop`` is set
    (the process's lifetime when None).
    """
    if not config.enabled:
        return None
    from edge_agent.apply.handler import ApplyMetrics, DesiredStateHandler
    from edge_agent.apply.model_fetch import ModelMetrics, ModelStager, ShopModelServer
    from edge_agent.apply.verify import RevisionStore, Verifier
    from edge_agent.protocol import ERROR_MAX_CHARS, ReportedState

    cluster = client if client is not None else make_client(config)

    def report(rep: ApplyReport) -> None:
        agent.send(ReportedState, release=rep.release, revision=rep.revision, status=rep.status, error=rep.error[:ERROR_MAX_CHARS], objects=rep.objects)
        if rep.status == "applied":
            agent.release = rep.release

    handler = DesiredStateHandler(
        agent.shop, Verifier.from_files(config.public_keys), RevisionStore(config.state_path), cluster, report,
        metrics=ApplyMetrics(agent.registry), ready_timeout_s=config.ready_timeout_s, poll_interval_s=config.poll_interval_s,
        retry_deadline_s=config.retry_deadline_s, retry_min_s=config.retry_min_s, retry_max_s=config.retry_max_s, self_ref=config.self_ref,
        models=ModelStager(config.models, ModelMetrics(agent.registry)),
    )
    if config.models.serve_port:
        try:
            ShopModelServer(config.models.dir / ".archives", config.models.serve_port).start()
        except OSError as exc:  # the applier still applies; the vision nodes' model-stage reports what is missing
            log.error("cannot serve model packages on port %s (%s): other nodes cannot stage models; free the port or change "
                      "apply.models.serve_port", config.models.serve_port, exc)
    agent.register_desired_state_handler(handler.handle, observe=handler.observe)
    if config.drift_interval_s > 0:
        threading.Thread(
            target=handler.run_reconciler, args=(stop or threading.Event(), config.drift_interval_s), name="apply-reconciler", daemon=True
        ).start()
    return handler
