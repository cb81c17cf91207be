"""Kafka plumbing: local broker, admin, clients and the dead-letter consumer."""
