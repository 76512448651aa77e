"""The local event broker of `bucketml dev`: Knative Trigger routing over a durable SQLite queue."""

from bucketml.broker.server import Broker, main
from bucketml.broker.triggers import (
    Delivery,
    ManifestError,
    Topology,
    Trigger,
    load_topology,
    parse_duration,
)

__all__ = ["Broker", "Delivery", "ManifestError", "Topology", "Trigger", "load_topology", "main", "parse_duration"]
