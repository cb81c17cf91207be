"""recloop's learner layer: pure torch, no Kafka, faust or SQL.

- ``spec.config_from_dict``: an algorithm's config from its manifest (the world's sizes are
  ``core.spec.WorldSpec``).
- ``batch``: the only events-to-tensors boundary (``to_batch``, ``request_batch``).
- ``replay``, ``nets``, ``maths``: shared building blocks; ``maths`` holds the papers'
  concepts as named pure functions.
- ``algorithms.<name>``: one module per algorithm, chosen by name via ``registry``.
"""
