"""The functions' work: each function in functions/ is a thin adapter over one step.

preprocess (upload -> prepared | rejected), train (prepared -> trained, published | failed),
batch (a file under batch/ -> predictions/ and batch.completed | batch.failed), deadletter (an
undeliverable event -> the bucket), and the CloudEvents-over-HTTP plumbing they share."""
