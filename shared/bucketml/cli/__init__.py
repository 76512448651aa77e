"""The `bucketml` command (click): a thin client of the bucket, the broker and predict."""
