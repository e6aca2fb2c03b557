"""The coordinator's weight-moving actions: hand-off, download, averaging, merging copies and
lending a model for one evaluation (:mod:`splitlearn.clients.actions`)."""

from __future__ import annotations

import logging

from ..wire.control import (Collect, Collected, LoadWeights, MergeServerCopies, Ready, Reply, SendAverage, SendWeights,
                            WeightsLoaded, WeightsMissing, WeightsRefused)
from ..wire.messages import Kind, Message, quote
from ..wire.transport import TransportError
from .instructing import Instructing
from .secure import LEFT_OUT, PHASES
from .schedule import Round

__all__ = ["WeightTransfers", "LOAD_REPLIES"]

log = logging.getLogger(__name__)

LOAD_REPLIES = (WeightsLoaded, WeightsMissing, WeightsRefused)


class WeightTransfers(Instructing):
    """How a :class:`~splitlearn.clients.coordinator.Coordinator` moves weights."""

    def _fetch(self, rnd: Round, holder: str, what: str, then: str, evaluation: bool = False) -> Message | None:
        """``holder``'s weights, sent to this coordinator; None if they did not come in time (``holder``
        is skipped for ``what``, the report saying ``then``)."""
        rid, gone = next(self._requests), self.gone([holder], now=True)
        try:
            self._instruct(holder, SendWeights(self.name, evaluation=evaluation), rid)
            got = self.take_weights([holder], rid, self.timeout, gone=gone).get(holder)
        except TransportError:
            got = None
        if got is None:
            self._skip(rnd, holder, what, f"{gone(holder) or f'its weights did not come within {self.timeout:g} s'}; "
                                          f"{then}")
        return got

    def _lend(self, rnd: Round, holder: str, client: str) -> bool:
        """Evaluation on another site's test rows: the run's model (``holder``'s weights) goes to
        ``client`` by way of this coordinator, kept there for that one turn (its own weights stay
        as they are); metered as evaluation traffic. False (the site is skipped) if they did not
        get there."""
        with self._metering(True):
            got = self._fetch(rnd, holder, "evaluation", f"{client}'s test rows are not scored", evaluation=True)
            if got is None:
                return False
            rid, gone = next(self._requests), self.gone([client], now=True)
            try:
                self._instruct(client, LoadWeights(self.name, lend=True, evaluation=True), rid)
                self.link.send(Message(Kind.WEIGHTS, self.name, client, rid, "weights", got.tensors))
            except TransportError as e:
                self._skip(rnd, client, "evaluation", f"cannot reach it: {e}")
                return False
            ans = self.replies([client], 2 * self.timeout, rid, *LOAD_REPLIES, gone=gone)
        if not isinstance(ans.get(client), WeightsLoaded) or ans[client].source != self.name:
            self._skip(rnd, client, "evaluation", f"the weights of {holder}: "
                       + (_not_loaded(ans[client], client) if client in ans else gone(client) or _not_loaded(None, client)))
            return False
        return True

    def _hand_off(self, rnd: Round, client: str) -> bool:
        """Sequential: the latest weights go from the holder to ``client`` (peer-to-peer between ring
        neighbours, else through this coordinator). False if ``client`` does not answer (its turn is
        skipped); if only the holder fails, the client trains on from its own weights (reported)."""
        holder = self.holder
        if holder in (None, client):
            return True
        peer = holder in self.strategy.weight_senders(self.plan, client)
        relayed = None
        if not peer:
            relayed = self._fetch(rnd, holder, "hand-off", f"{client} trains on from its own")
            if relayed is None:
                return True
        rid, gone = next(self._requests), self.gone([client], now=True)
        try:
            self._instruct(client, LoadWeights(holder if peer else self.name), rid)
            if relayed is not None:
                self.link.send(Message(Kind.WEIGHTS, self.name, client, rid, "weights", relayed.tensors))
        except TransportError as e:
            self._skip(rnd, client, "hand-off", f"cannot reach it ({e}); its turn is skipped")
            return False
        if peer:
            try:
                self._instruct(holder, SendWeights(client), rid)
            except TransportError as e:  # the client will say that nothing came
                log.warning("%s: hand-off from %s: %s", self.name, holder, e)
        ans = self.replies([client], 2 * self.timeout, rid, *LOAD_REPLIES, gone=gone)
        if client not in ans:  # the client itself waits up to one timeout for the weights
            self._skip(rnd, client, "hand-off",
                       f"{gone(client) or f'no answer within {2 * self.timeout:g} s'}; its turn is skipped")
            return False
        if not isinstance(ans[client], WeightsLoaded):
            self._skip(rnd, holder, "hand-off", f"{_not_loaded(ans[client], client)}; {client} trains on from its own")
        return True

    def _download(self, rnd: Round, names: list[str] | tuple[str, ...], evaluation: bool = False) -> list[str]:
        """Averaging schedules: the clients receive the federation's weights (at the start of a
        round, or before evaluating the averaged model: metered as evaluation traffic); who did."""
        apart = self.federation != self.name
        requests: dict[str, int] = {}
        gone = self.gone(names, now=True)
        for c in names:
            try:
                requests[c] = self._instruct(c, LoadWeights(self.federation, ready=evaluation and apart,
                                                            evaluation=evaluation))
            except TransportError as e:
                self._skip(rnd, c, "download", f"cannot reach it: {e}")
        asked, unready = set(requests), set()
        if evaluation and apart:  # the weights may not overtake the command: it decides the meter
            ready = self.replies(list(requests), self.timeout, requests, Ready, gone=gone)
            unready = set(requests) - set(ready)
            requests = {c: r for c, r in requests.items() if c in ready}
        try:
            if apart:
                self._instruct(self.federation, SendAverage(tuple(requests), tuple(requests.values()), evaluation))
        except TransportError as e:
            log.warning("%s: download: %s", self.name, e)
        if not apart:
            with self._metering(evaluation):
                for c, r in requests.items():
                    try:
                        self.send_weights(c, r)
                    except TransportError as e:  # (one client gone: the others get theirs)
                        log.warning("%s: download to %s: %s", self.name, c, e)
        ans = self.replies(list(requests), self.timeout, requests, *LOAD_REPLIES, gone=gone)
        what = "evaluation download" if evaluation else "download"
        loaded = []
        for c in names:
            if c not in ans:
                if c in asked:  # (not ready in time, or no answer to the load)
                    self._skip(rnd, c, what, gone(c) or (f"it did not say it was ready within {self.timeout:g} s"
                                                         if c in unready else f"no answer within {self.timeout:g} s"))
            elif not isinstance(ans[c], WeightsLoaded) or ans[c].source != self.federation:
                self._skip(rnd, c, what, f"the federation's weights: {_not_loaded(ans[c], c)}")
            else:
                loaded.append(c)
        return loaded

    def _average(self, rnd: Round, done: tuple[str, ...]) -> list[str]:
        """The clients that trained send their weights to the federation, which averages them."""
        rid, gone = next(self._requests), self.gone(done, now=True)  # (why one's weights did not come, if it can tell)
        sending = []
        for c in done:
            try:
                self._instruct(c, SendWeights(self.federation), rid)
                sending.append(c)
            except TransportError as e:
                self._skip(rnd, c, "averaging", f"cannot reach it: {e}")
        samples = [rnd.samples[self.clients.index(c)] for c in sending]
        refused: dict[str, str] = {}
        if self.federation == self.name:
            got, refused = self.collect(sending, samples, rid)
        else:
            fed = self.gone([self.federation], now=True)
            try:
                self._instruct(self.federation, Collect(tuple(sending), tuple(samples)), rid)
            except TransportError as e:
                self._skip(rnd, self.federation, "averaging", f"cannot reach the federation: {e}")
                return []
            # secure aggregation: its phases of up to a timeout each, and a margin
            wait = (PHASES + 2 if self.spec.secure_aggregation else 2) * self.timeout
            ans = self.replies([self.federation], wait, rid, Collected, gone=fed)
            if self.federation not in ans:
                self._skip(rnd, self.federation, "averaging",
                           fed(self.federation) or f"the federation did not answer within {wait:g} s")
                return []
            got = [c for c in ans[self.federation].averaged if c in sending]
            refused = ans[self.federation].refused
        for c in sending:
            if c in refused and refused[c].startswith(LEFT_OUT):  # secure aggregation: it withdrew, or was left out
                self._skip(rnd, c, "averaging", f"{LEFT_OUT}{quote(refused[c][len(LEFT_OUT):], 300)}")
            elif c in refused:  # it is there, and sent what the federation refused: skipped at once
                self._skip(rnd, c, "averaging", f"its weights were refused by {self.federation}: {quote(refused[c])}")
            elif c not in got:
                self._skip(rnd, c, "averaging", gone(c) or f"its weights did not come within {self.timeout:g} s")
        return got

    def _merge_copies_everywhere(self, rnd: Round, clients: tuple[str, ...]) -> None:
        """SplitFed v1: every fixed party (this one too) merges the round's copies of its segments."""
        samples = [rnd.samples[self.clients.index(c)] for c in clients]
        if self.setup is not None:
            self.merge_copies(list(clients), samples)
        for p in self.plan.parties:
            if p not in (self.spec.template, self.name):
                self._instruct(p, MergeServerCopies(tuple(clients), tuple(samples)))


def _not_loaded(answer: Reply | None, client: str) -> str:
    """Why weights did not get into ``client``, from its reply: refused (and why), or not come."""
    if isinstance(answer, WeightsRefused):
        return f"{client} refused them: {quote(answer.why)}"
    if isinstance(answer, WeightsMissing):
        return (f"they did not reach {client}: {quote(answer.why, 300)}" if answer.why
                else f"they did not reach {client} within {client}'s timeout")
    return f"{client} did not say it loaded them ({quote(answer)})"
