"""The broker between nodes, as the actors see it: two narrow protocols.

Several ``threadline serve`` processes ("nodes") form one cluster. Each node's hub hosts thread
actors for the threads its clients watch; the broker carries between nodes what those actors
must see of the others:

* **durable events** committed on other nodes (each node publishes its own after commit through
  ``Broker.publish``), delivered to ``BrokerSink.deliver`` with their data, or to
  ``BrokerSink.notice`` when too big to travel (the actor reads it from the log). One lost on the
  way (its writer cancelled or died between commit and publish, a broker outage) is found by the
  hub's reconciliation: every second each actor's last seq is compared with the log's;
* **ephemeral events** (``assistant.started``, ``assistant.delta``) of replies generated on
  another node, delivered to ``BrokerSink.deliver`` with ``origin`` set; this node's own ones go
  out through ``Broker.publish``;
* ``BrokerSink.resync()`` after the broker lost its connection and got it back: whatever was
  published meanwhile is in the log, and every thread actor re-reads it from its last seq.

The implementation on PostgreSQL LISTEN/NOTIFY is ``server/broker.py``; this package never
imports it.
"""

from __future__ import annotations

from typing import Protocol

from server.events import ThreadEvent


class Broker(Protocol):
    """What the hub needs to reach the other nodes."""

    def publish(self, event: ThreadEvent) -> None:
        """Offer an event of this node (durable, after its commit, or ephemeral) to the others.
        Never blocks; may drop it (a durable one is then found by reconciliation; ephemeral
        events are best-effort: the durable closing event carries the text)."""


class BrokerSink(Protocol):
    """What the broker hands incoming events to (the hub implements it). Never blocks."""

    def known_seq(self, thread_id: str) -> int | None:
        """The last seq delivered on this node for ``thread_id``; None if no actor is live for
        it (then nobody here listens and the event can be skipped unread)."""

    def deliver(self, event: ThreadEvent) -> None:
        """A durable event (``seq`` set) committed on any node, or an ephemeral one (``seq``
        None) published by another node."""

    def notice(self, thread_id: str, seq: int) -> None:
        """Durable event ``seq`` was committed but did not fit the broker: read it from the log."""

    def resync(self) -> None:
        """The broker was disconnected: every actor re-reads the log from its last seq."""
