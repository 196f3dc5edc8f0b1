"""A backend that raises while being imported."""

raise RuntimeError("database URL not configured")
