"""Which model answers a request: the current model, and optionally a candidate in shadow or canary.

Every request asks the router once (``routes()``) and keeps that snapshot: a ``Routes`` is immutable, and a swap
replaces the whole snapshot in one assignment, so a request that started on one model finishes on it (its
predictor stays alive as long as the request holds it) while new requests see the new routes at once. Nothing
in the front ends captures a model at build time: header, vocab, shortcut keys and the REST handler all read
it from the answer or from ``routes()``.

* shadow: the candidate scores every request beside the current model; its answers are logged, never shown.
* canary: the candidate answers a share of traffic, sticky per session (the same session always gets the same
  model while the share is unchanged), chosen by a hash so every replica agrees without coordination.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import numpy as np

from model.predictor import ModelInfo
from review.scoring import unit_hash

Role = Literal["shadow", "canary"]


class Predictor(Protocol):
    info: ModelInfo

    def predict_probs(self, images) -> np.ndarray: ...


@dataclass(frozen=True)
class Routes:
    current: Predictor
    candidate: Predictor | None = None
    role: Role | None = None
    canary_share: float = 0.0

    def __post_init__(self) -> None:
        if (self.candidate is None) != (self.role is None):
            raise ValueError("a candidate needs a role (shadow or canary), and a role needs a candidate")
        if not 0.0 <= self.canary_share <= 1.0:
            raise ValueError("canary_share must be within [0, 1]")

    def answering(self, session: str | None) -> Predictor:
        """The model that answers this session: the canary for its share of sessions, else the current one."""
        if self.role != "canary" or self.candidate is None or self.canary_share <= 0.0:
            return self.current
        # Without a session (a REST call without X-Loupe-Session) there is nothing to stick to: such requests stay
        # on the current model, so a client that cannot keep a session never flips between versions.
        if not session:
            return self.current
        draw = unit_hash([session], f"canary:{self.candidate.info.version}:")[0]
        return self.candidate if draw < self.canary_share else self.current

    def shadow(self) -> Predictor | None:
        return self.candidate if self.role == "shadow" else None

    def versions(self) -> dict[str, str]:
        """{"current": version, and "shadow"/"canary": version when a candidate is set}."""
        out = {"current": self.current.info.version}
        if self.candidate is not None and self.role is not None:
            out[self.role] = self.candidate.info.version
        return out


class ModelRouter:
    def __init__(self, current: Predictor):
        self._routes = Routes(current)
        self._lock = threading.Lock()  # serialises writers; readers need no lock (one reference read)
        self._listeners: list[Callable[[Routes], None]] = []
        self._refresh: Callable[[], object] | None = None
        self._refresh_status: Callable[[], dict] | None = None

    def routes(self) -> Routes:
        return self._routes

    @property
    def current(self) -> Predictor:
        return self._routes.current

    def on_change(self, listener: Callable[[Routes], None]) -> None:
        """Call ``listener(new_routes)`` after every change (e.g. to re-score labelled images for a new model)."""
        self._listeners.append(listener)

    def _swap(self, make: Callable[[Routes], Routes]) -> Routes:
        with self._lock:
            old = self._routes
            self._routes = new = make(old)
        if new != old:
            for listener in self._listeners:
                listener(new)
        return new

    def set_candidate(self, candidate: Predictor | None, role: Role | None, canary_share: float = 0.0) -> Routes:
        return self._swap(lambda r: replace(r, candidate=candidate, role=role,
                                            canary_share=canary_share if role == "canary" else 0.0))

    def promote(self, new_current: Predictor) -> Routes:
        """``new_current`` answers from now on; any candidate is dropped (it either is the new model or is stale)."""
        return self._swap(lambda _: Routes(new_current))

    def set_routes(self, routes: Routes) -> Routes:
        """Replace the whole snapshot at once (the registry follower: current, candidate, role and share together,
        so no request ever sees half a change)."""
        return self._swap(lambda _: routes)

    def set_refresher(self, refresh: Callable[[], object] | None, status: Callable[[], dict] | None = None) -> None:
        """Who keeps these routes in step with the model registry (serving.follower.RegistryFollower: its ``sync``
        and its ``status``, which the Models tab shows)."""
        self._refresh, self._refresh_status = refresh, status

    def refresher_status(self) -> dict | None:
        return self._refresh_status() if self._refresh_status is not None else None

    def refresh(self) -> Routes:
        """Follow the registry now, not at the next poll (after a rollout action taken in this process)."""
        refresh = self._refresh
        if refresh is not None:
            refresh()
        return self._routes
