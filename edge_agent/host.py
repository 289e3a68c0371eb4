"""What a plug-in sees of the node agent: the :class:`AgentHost` protocol.

Plug-ins (the apply path in ``edge_agent.apply.plugin``, or a deployment's own) get the agent as
an ``AgentHost`` in their ``attach(agent, ...)``: enough to send messages through the outbox,
answer commands, receive desired states, report the release and register metrics, and nothing
of the agent's threads or outbox. :class:`edge_agent.agent.Agent` satisfies it; a test can pass
a small fake. This module imports nothing heavy, so a plug-in module can name the type at import
time without loading the agent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from edge_agent.protocol import Command, DesiredState, Uplink

U = TypeVar("U", bound="Uplink")
CommandHandler = Callable[["Command"], dict[str, Any]]
"""Runs a command and returns its result; raising makes the reply ``ok: false`` with the error."""
DesiredStateHandler = Callable[["DesiredState"], object]
"""Receives each new desired state of the shop and reports through ``agent.send(ReportedState, ...)``; its return value is ignored."""


class AgentHost(Protocol):
    """The agent as plug-ins use it."""

    shop: str
    node: str
    registry: CollectorRegistry
    """The agent's own Prometheus registry; a plug-in registers its metrics here."""
    release: str | None
    """Release this node runs, reported in heartbeats; the apply plug-in sets it."""

    def send(self, model: type[U], **fields: Any) -> int:
        """Store an uplink message (envelope filled in) in the outbox; return its seq."""
        ...

    def register_command(self, name: str, handler: CommandHandler) -> None:
        """Answer commands called ``name`` with ``handler``."""
        ...

    def register_desired_state_handler(self, handler: DesiredStateHandler, observe: Callable[[DesiredState], bool] | None = None) -> None:
        """Call ``handler`` with every new desired state of this node's shop."""
        ...
