"""recloop's core layer."""
