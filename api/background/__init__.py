"""Loops that run beside the requests in every API process: delivery guarantees (reconciler),
evaluation runs, Batch API batches, and the window of background jobs each model takes."""
