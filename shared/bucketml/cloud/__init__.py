"""Cluster-only adapters: the GCS notification source, `bucketml deploy`/`status` against
Kubernetes, and training as a Kubernetes Job."""
