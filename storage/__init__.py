"""recloop's storage layer."""
