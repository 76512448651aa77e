"""What the platform watches once a version serves: the training data's distributions, what
predict replicas saw (per version, written to the bucket), and the decisions drawn from them
(canary promotion or rollback, drift). numpy only: the predict function imports it."""
