"""One module per algorithm; each defines Config, <Name>Policy, <Name>Agent and load_policy.

Pick one by name through ``learner.registry``.
"""
