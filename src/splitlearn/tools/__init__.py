"""Tools around runs: the cost model, compare (split learning against its baselines), pictures, the audit.
"""
