"""CycleTune: models."""
