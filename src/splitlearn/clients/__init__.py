"""Horizontal clients (``[clients]``): who takes part (:mod:`.layout`, :mod:`.roles`) and what each
runs (:mod:`.parties`), the rounds (:mod:`.schedule`, pure), the strategies that configure them
(:mod:`.strategies`, as :mod:`.actions`), the coordinator that carries them out
(:mod:`.coordinator`, :mod:`.instructing`, :mod:`.transfers`, :mod:`.recovery`) and the participants
that follow it (:mod:`.participant`, :mod:`.follower`, :mod:`.turns`, :mod:`.saving`,
:mod:`.scoring`, :mod:`.weights`, :mod:`.context`).
"""
