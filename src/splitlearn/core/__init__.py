"""The core: a plan (what runs where), its graph (nodes, wires, stages), the engine (one party's step)
and the registries of the parts it names (defenses, loss kinds, schedules).

Pure logic: no sockets, and no files but plan files (``parse_plan`` of a path).
"""
