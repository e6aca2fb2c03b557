"""Every plan's schedule and parties: who takes part and what each runs (:mod:`.layout`, :mod:`.roles`,
:mod:`.parties`), the one participant type (:mod:`.participant`, with :mod:`.turns`, :mod:`.saving`,
:mod:`.scoring`, :mod:`.weights`, :mod:`.context`), a plain plan's trivial schedule (:mod:`.peer`),
what a schedule adds to results and compare's derived plans (:mod:`.results`, :mod:`.baselines`);
and horizontal clients (``[clients]``): the rounds (:mod:`.schedule`, pure), the strategies that
configure them (:mod:`.strategies`, as :mod:`.actions`), the coordinator that carries them out
(:mod:`.coordinator`, :mod:`.instructing`, :mod:`.transfers`, :mod:`.recovery`) and the followers
(:mod:`.follower`).
"""
