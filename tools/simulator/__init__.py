"""A simulator that plays a day of hometeam in real time, through the real webhooks and topics.

    python -m tools.simulator --seed 42 --rate 3 --duration 300 \\
        --ingest-url http://127.0.0.1:8081 --bootstrap 127.0.0.1:19092 [--topic-prefix ""]

- ``script``: the plan, a pure function of (seed, rate, duration, start time, team directory):
  agents signing in when their team opens and out when it closes (and a few breaks and early
  sign-outs), customers of every region writing on all three channels, returning customers,
  an opt-out customer, after-hours traffic, and a local surge.
- ``channels``: how one customer message is sent: a ``ChannelMessagePosted`` envelope for
  ``channel.inbound.v1``, or a signed webhook request (Twilio signature, HS256 bearer JWTs).
- ``runner``: plays the script and reacts to the system: simulated agents reply and resolve
  what ``conversations.events.v1`` says they hold; simulated customers answer the replies on
  ``messages.outbound.v1``; some answer a satisfaction survey.
"""
