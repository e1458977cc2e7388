"""The supervised and cycle losses of each phase; each module owns the settings it reads."""
