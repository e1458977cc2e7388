"""CycleTune: losses."""
