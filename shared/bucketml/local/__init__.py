"""The local runtime of `bucketml dev`: the supervisor, the broker, the bucket watcher, the demo,
and the client the CLI and the demo use to upload and follow an outcome. Never runs in a cluster."""
