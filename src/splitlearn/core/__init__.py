"""The core: a plan (what runs where), its graph (nodes, wires, stages) and the engine (one party's step).

Pure logic: no sockets and no files.
"""
