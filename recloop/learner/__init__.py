"""recloop's learner layer: pure torch, no Kafka, faust or SQL.

- ``spec.WorldSpec``: the sizes of the world an agent learns in.
- ``batch``: the only events-to-tensors boundary (``to_batch``, ``request_batch``).
- ``replay``, ``nets``, ``maths``: shared building blocks; ``maths`` holds the papers'
  concepts as named pure functions.
- ``algorithms.<name>``: one module per algorithm, chosen by name via ``registry``.
"""
