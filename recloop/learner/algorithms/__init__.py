"""One module per algorithm; each defines ``Config``, its policy, its agent class (named as
``AGENT``), its ``Metrics`` record, ``EXPLORATION_STREAM`` and ``load_policy``.

Pick one by name through ``learner.registry``.
"""
