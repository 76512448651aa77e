"""The web console: server-rendered pages to see and steer every model (docs/architecture.md#the-console)."""
