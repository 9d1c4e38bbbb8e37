"""Topic names, message keys and partitioning: in one place.

Every click-stream record is keyed by user id, so all events of one user land on one
partition in order (Kafka's default murmur2 partitioner on the key). Topic names carry
a prefix so several deployments can share a cluster.

>>> t = Topics()
>>> t.events, t.requests, t.dead_letter
('towerstream.events', 'towerstream.requests', 'towerstream.dead-letter')
>>> Topics(prefix="staging").rankings
'staging.rankings'
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Topics", "DEFAULT_PARTITIONS", "ITEMS_PARTITIONS", "key_for_user"]

DEFAULT_PARTITIONS = 4
ITEMS_PARTITIONS = 1


@dataclass(frozen=True)
class Topics:
    """The topic names used by one towerstream deployment.

    Parameters
    ----------
    prefix
        Prepended with a dot to every topic name.
    """

    prefix: str = "towerstream"

    def _name(self, suffix: str) -> str:
        return f"{self.prefix}.{suffix}"

    @property
    def events(self) -> str:
        """Impressions (with their click label) and clicks: what learners learn from."""
        return self._name("events")

    @property
    def requests(self) -> str:
        """Request events: a user asking for candidates."""
        return self._name("requests")

    @property
    def rankings(self) -> str:
        """The scorer's ranked lists, keyed by request id."""
        return self._name("rankings")

    @property
    def dead_letter(self) -> str:
        """Records that failed to decode or validate, with the reason."""
        return self._name("dead-letter")

    @property
    def index_control(self) -> str:
        """Announcements of published index versions (one partition, compacted)."""
        return self._name("index-control")

    @property
    def items(self) -> str:
        """Item events (new, changed, retired items), keyed by item id: the index deltas.

        One partition (:data:`ITEMS_PARTITIONS`): its offset + 1 is the item-log sequence
        (``delta_seq``) that names what a scorer serves and what a build covered. Item
        changes are rare next to clicks (hundreds per second at most), so one partition
        is no bottleneck."""
        return self._name("items")

    def all(self) -> tuple[str, ...]:
        """Every topic name, for topic creation."""
        return (self.events, self.requests, self.rankings, self.dead_letter, self.index_control)


def key_for_user(user_id: str) -> bytes:
    """The message key of an event: its user id, UTF-8 encoded.

    >>> key_for_user("u42")
    b'u42'
    """
    return user_id.encode("utf-8")
