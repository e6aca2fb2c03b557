"""Running plans: setting parties up, the session every party runs, who connects to whom, the thread and
process launchers, and the results.
"""
