"""CycleTune: data."""
