"""Kafka process shells: settings -> wiring -> loop around the pure cores."""
