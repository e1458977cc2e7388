"""Records from every source type, resumable rank-sharded batches, and the synthetic shapes world."""
