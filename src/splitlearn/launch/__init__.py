"""Launchers: start a plan's physical parties as threads (:mod:`.threads`), party processes
(:mod:`.processes`, forked by :mod:`.forker`) or Ray actors (:mod:`.onray`), and gather their
reports into a run's results (:mod:`.results`)."""
