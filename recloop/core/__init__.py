"""recloop's core layer: the contract every other package stands on (no torch, faust, Kafka
clients, SQLAlchemy or faiss).

- ``events``: every record that crosses a process boundary; ``codec``: their wire format
- ``topics``: the topic table; ``dlq``: the dead-letter headers
- ``ports``: the protocols the layers meet at (``SlatePolicy``, ``SnapshotStore``, ``Bus``)
- ``membus``: the in-memory ``Bus`` (the in-process loop and tests)
- ``spec``: ``WorldSpec``, the sizes of a world shared by simulator, learner and serving
- ``snapshot``: the snapshot format (safetensors + JSON manifest)
- ``settings``: process settings from ``RECLOOP_*`` environment variables
"""
