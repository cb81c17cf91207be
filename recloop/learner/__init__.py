"""recloop's learner layer: pure torch, no Kafka, faust or SQL.

- ``contract``: the ``Agent`` protocol the services hold, and the ``Metrics`` base of each
  algorithm's typed update record (``as_dict()`` for manifests and logs).
- ``spec.config_from_dict``: an algorithm's config from its manifest (the world's sizes are
  ``core.spec.WorldSpec``).
- ``batch``: the only events-to-tensors boundary (``to_batch``, ``request_batch``); every
  item feature row comes by id from the ``core.catalogue.ItemCatalogue`` the agent holds
  (``ReplayAgent.set_catalogue``), the table serving features its candidates from.
- ``agent``: ``ReplayAgent``, the contract implemented once (counters, replay schedule,
  snapshots); ``policy``: ``SeededPolicy``, ``recommend`` written once around each
  algorithm's ``_score`` and ``_pull``, and the table of random streams.
- ``replay``, ``nets``, ``maths``, ``actor_critic``: shared building blocks; ``maths`` holds
  the papers' concepts as named pure functions, ``actor_critic`` what DRR and Wolpertinger
  share (one config base).
- ``publishing``: the learn service's bookkeeping (dedupe, digest, schedule, manifest), no I/O.
- ``algorithms.<name>``: one module per algorithm, naming its agent class as ``AGENT``, chosen
  by name via ``registry``.
"""
