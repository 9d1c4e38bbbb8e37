"""The event contract and Kafka: schema and validation, topics and keys, the client
interface (kafka-python or confluent-kafka), dead-lettering, the event consumer loop,
the simulator and replay producers, and the local broker launcher.

Kafka clients are imported only through :mod:`streams.transport`; the broker launcher
(:mod:`streams.broker`) and producers (:mod:`streams.simulator`, :mod:`streams.replay`)
are imported on demand.
"""

from streams.errors import ConfigError, EventValidationError, StreamsError, TowerstreamError
from streams.events import SCHEMA_VERSION, Event, decode_event, encode_event, event_from_dict
from streams.topics import DEFAULT_PARTITIONS, Topics, key_for_user
from streams.transport import KafkaSettings, make_consumer, make_producer, ensure_topics

__all__ = [
    "ConfigError",
    "EventValidationError",
    "StreamsError",
    "TowerstreamError",
    "SCHEMA_VERSION",
    "Event",
    "decode_event",
    "encode_event",
    "event_from_dict",
    "DEFAULT_PARTITIONS",
    "Topics",
    "key_for_user",
    "KafkaSettings",
    "make_consumer",
    "make_producer",
    "ensure_topics",
]
