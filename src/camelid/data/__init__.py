"""Training data: reading chat datasets into conversations, and the steps that turn them into batches."""
