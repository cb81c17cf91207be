"""recloop's streams layer."""
