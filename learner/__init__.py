"""recloop's learner layer."""
