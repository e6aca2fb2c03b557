"""Active attacks: malicious party implementations, run in this process against honest parties of a plan.

Nothing here is reachable from a production run: an import-linter contract (``pyproject.toml``) forbids every
import of ``splitlearn.tools.audit.active`` in the CLI and every layer below the tools (the audit's registry loads
its attacks by name, which the contract cannot see: the audit runs them only when named), and
``tests/test_audit_active.py`` checks that the entry points that train, serve or launch a party never load it.
An active attack replaces one party's behaviour through :func:`~splitlearn.tools.audit.active.harness.run_against`;
the parties it attacks are the engine's own, unchanged.
"""
