"""What each consumer of a service asks the broker for."""

from __future__ import annotations


def test_team_routing_polls_its_routing_commands_sooner_than_presence() -> None:
    """A conversation waits for its decision: routing commands are fetched with a 10 ms wait
    (``ROUTING_COMMANDS_FETCH_MAX_WAIT_MS``), agent presence with the service's 40."""
    from services.team_routing.app import TeamRoutingSettings, create_service

    service = create_service(TeamRoutingSettings())
    waits = {s.topics[0].name: s._connection_args["fetch_max_wait_ms"] for s in service.broker.subscribers}
    assert waits == {"routing.commands.v1": 10, "agent.presence.v1": 40}
