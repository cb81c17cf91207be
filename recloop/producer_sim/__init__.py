"""Simulated users: a RecSim-style world (documents + users + choice), numpy only.

- ``documents``: the catalogue (cluster, quality, length, features) and candidate sampling
- ``users``: the interest-evolution user model, vectorised over users
- ``choice``: multinomial logit, multinomial proportional and cascade choice models
- ``world``: ``World`` (static) and ``Simulation`` (live users, seeded generators)
- ``presets``: ``interest_evolution``, ``tiny_world``, ``large_catalogue`` by name
- ``cohort`` and ``wire``: users that speak in wire events (shared by every transport)
- ``runner``: ``run_episodes`` drives a world with any ``SlatePolicy`` in process
- ``policies``: ``RandomPolicy`` and ``MyopicOraclePolicy`` baselines
"""
