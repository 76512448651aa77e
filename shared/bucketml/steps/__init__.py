"""The functions' work: each function in functions/ is a thin adapter over one step.

preprocess (upload -> prepared | rejected), train (prepared -> trained, published | failed),
deadletter (an undeliverable event -> the bucket), and the CloudEvents-over-HTTP plumbing they share."""
