"""Active attacks: malicious party implementations, run in this process against honest parties of a plan.

Nothing here is reachable from a production run: the layers of ``pyproject.toml``'s import-linter contracts keep
every module that trains, serves or launches a party from importing it (``splitlearn.tools.audit.active`` is
forbidden to them by name), and ``tests/test_audit_active.py`` checks that a party process never loads it.
An active attack replaces one party's behaviour through :func:`~splitlearn.tools.audit.active.harness.run_against`;
the parties it attacks are the engine's own, unchanged.
"""
