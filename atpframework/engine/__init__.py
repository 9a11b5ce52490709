"""Running a compiled plan: batches, run-time checks, checkpoints, output placement, sharding."""
