"""The local event broker of `bucketml dev`: Knative Trigger routing over a durable SQLite queue."""

from bucketml.local.broker.server import Broker, main
from bucketml.local.broker.triggers import (
    Delivery,
    ManifestError,
    Topology,
    Trigger,
    load_topology,
    parse_duration,
)

__all__ = ["Broker", "Delivery", "ManifestError", "Topology", "Trigger", "load_topology", "main", "parse_duration"]
