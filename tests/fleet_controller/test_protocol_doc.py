"""docs/protocol.md documents every topic and message of the wire protocol, with examples that parse."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edge_agent import protocol as P

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
EXAMPLES = re.findall(r"<!-- example topic=(\S+) -->\n```json\n(.*?)\n```", DOC, re.S)
MESSAGES = [P.Presence, P.Heartbeat, P.Telemetry, P.Event, P.Alert, P.CommandResult, P.ReportedState,
            P.Command, P.DesiredState, P.ControllerPresence, P.ClockBeacon]


@pytest.mark.parametrize(("topic", "body"), EXAMPLES, ids=[f"{i}-{t}" for i, (t, _) in enumerate(EXAMPLES)])
def test_example_parses_on_its_topic(topic, body):
    info = P.parse_topic(topic)
    downlink = info.leaf in ("commands", "state/desired", "controller/presence", "controller/clock")
    msg = (P.parse_downlink if downlink else P.parse_message)(topic, body.encode())
    assert msg.v == P.SCHEMA_VERSION


def test_every_message_and_field_is_documented():
    assert len(EXAMPLES) >= len(MESSAGES)
    for cls in MESSAGES:
        assert f"`{cls.__name__}`" in DOC, cls.__name__
        section = DOC.split(f"`{cls.__name__}` —", 1)[1].split("```json", 1)[0]
        for field in cls.model_fields:
            assert f"| `{field}` |" in section, f"{cls.__name__}.{field}"


def test_every_topic_and_reason_is_documented():
    for t in (*P.Topics.controller_subscriptions, P.Topics.controller_presence, P.Topics.controller_clock):
        assert t.replace("+/+", "{shop}/{node}").replace("+/state", "{shop}/state") in DOC or t in DOC, t
    for channel in P.Channel:
        assert f"fleet/v1/{{shop}}/{{node}}/{channel.value}" in DOC
    for reason in P.REJECT_REASONS:
        assert f"| `{reason}` |" in DOC
