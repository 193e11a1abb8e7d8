"""The messaging KPIs as Prometheus metrics. Labels are bounded: team (a pool id from the team
directory, or 'standard'), agent (an agent id from the directory), channel, direction, pool,
reason, status, score. Never customer ids, phone numbers or text.

Counters count what happened since the process started (Prometheus handles resets); the
ratios (closed per staffed hour, cost per resolved contact, lines per turn, repeat-contact
rate, overflow rate, CSAT) are recording rules in ``deploy/prometheus/rules/``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SECONDS_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400, 259200)


class KpiMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        self.closed = counter(
            "hometeam_conversations_closed_total",
            "Conversations closed (resolved or closed inactive), by the team and agent holding them.",
            ["team", "agent", "status"],
        )
        self.staffed = counter(
            "hometeam_staffed_agent_seconds_total", "Seconds agents were online (staffed), by team and agent.", ["team", "agent"]
        )
        self.messages = counter(
            "hometeam_messages_total", "Transcript lines, by team, direction and channel.", ["team", "direction", "channel"]
        )
        self.turns = counter(
            "hometeam_turns_total", "Turns: maximal runs of consecutive messages by one side.", ["team"]
        )
        self.repeats = counter(
            "hometeam_repeat_contacts_total",
            "Resolved conversations followed by a new conversation from the same customer within 7 days.",
            ["team"],
        )
        self.routed = counter(
            "hometeam_conversations_routed_total",
            "Conversations placed for the first time, by pool, team and pool reason.",
            ["pool", "team", "reason"],
        )
        self.overflow = counter(
            "hometeam_overflow_total",
            "Conversations placed in the standard pool by rule, by home team and reason (after_hours, opt_out, surge).",
            ["team", "reason"],
        )
        self.response_target_missed = counter(
            "hometeam_response_target_missed_total", "Conversations offered to a teammate after a missed response target.", ["team"]
        )
        self.csat = counter("hometeam_csat_responses_total", "Survey answers, by team and score (1-5).", ["team", "score"])
        self.first_response = Histogram(
            "hometeam_first_response_seconds",
            "From a conversation's first customer message to the first agent reply.",
            ["team"],
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.resolution = Histogram(
            "hometeam_resolution_seconds",
            "From a conversation's opening to its resolution.",
            ["team"],
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.cost_per_hour = Gauge(
            "hometeam_agent_cost_per_hour", "Configured loaded cost of one staffed agent-hour, by team.", ["team"], registry=registry
        )
        self.queue_depth = Gauge("hometeam_queue_depth", "Conversations waiting in a pool's queue.", ["pool"], registry=registry)
        self.oldest_wait = Gauge(
            "hometeam_queue_oldest_wait_seconds", "Wait of the longest-waiting conversation in a pool's queue.", ["pool"], registry=registry
        )
        self.agents_online = Gauge("hometeam_agents_online", "Agents online in a pool.", ["pool"], registry=registry)
        self.capacity_online = Gauge(
            "hometeam_pool_capacity_online", "Sum of the max concurrency of a pool's online agents.", ["pool"], registry=registry
        )
        self.load = Gauge("hometeam_pool_load", "Sum of the weights of conversations assigned in a pool.", ["pool"], registry=registry)
        self.surging = Gauge("hometeam_pool_surging", "1 while a team is in a surge.", ["pool"], registry=registry)
        self.consumer_lag = Gauge(
            "hometeam_consumer_lag_records", "Records not yet consumed, by consumer group and topic.", ["group", "topic"], registry=registry
        )
