"""bucketml: drop a CSV into a bucket, get a versioned ONNX model served over HTTP.

Kept import-free on purpose: the predict function imports this package and must not pay
for scikit-learn or pandas at start-up.
"""

__version__ = "0.1.0"
