"""recloop's producer_sim layer."""
