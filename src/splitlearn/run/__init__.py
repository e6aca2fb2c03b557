"""One party's life in a run: set up from the plan and its own data (setup, rows, align), its
session (hello, handshake, steps, goodbye; resume), checkpoints, its report, tracking. The launchers
that start parties are in :mod:`splitlearn.launch`.
"""
