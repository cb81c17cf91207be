"""recloop: the CLI and the wiring, the only package that imports every other layer."""
