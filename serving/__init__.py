"""recloop's serving layer."""
