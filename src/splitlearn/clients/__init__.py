"""Horizontal clients: schedules (pure), their strategies, and the roles that carry them out.
"""
