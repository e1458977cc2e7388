"""CycleTune: train."""
