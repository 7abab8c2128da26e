"""Which adapter each slot of a :class:`~services.inference.lora_batch.LoraSlots` holds, and which
slot a new adapter gets.

Slots are reference-counted by in-flight requests: a slot holding ``a@1`` stays until its last user
releases it, even when ``a@2`` arrives (``a@2`` gets another slot; slots are keyed by
``AdapterWeights.ref``). A slot with no user keeps its weights for reuse until another adapter needs
it; the one to reuse is an empty slot if any, else the least recently used one. When every slot has
users, :meth:`SlotPool.acquire` says so and the request waits.

Not thread-safe: the engine calls it with its lock held.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from services.inference.errors import RequestFailedError
from services.inference.lora_batch import AdapterWeights, LoraSlots


class SlotPool:
    """Slot bookkeeping over ``slots``: adapter ref per slot, users, last use.

    Args:
        slots: the slot tables the adapters are copied into.
        on_load: called with ``(ref, seconds, ok)`` after every copy into a slot (or failed copy).
    """

    def __init__(self, slots: LoraSlots, on_load: Callable[[str, float, bool], None] | None = None) -> None:
        self.slots = slots
        self._on_load = on_load
        n = slots.num_slots
        self._ref: list[str | None] = [None] * n
        self._users = [0] * n
        self._used_at = [0.0] * n
        self._slot_of: dict[str, int] = {}

    def acquire(self, weights: AdapterWeights) -> int | None:
        """A slot holding ``weights`` (copied in if needed) with one more user; None when every slot
        has users of other adapters.

        Raises:
            RequestFailedError: copying the weights into the slot failed (the slot is left empty).
        """
        ref = weights.ref
        slot = self._slot_of.get(ref)
        if slot is None:
            free = [s for s in range(self.slots.num_slots) if self._users[s] == 0]
            if not free:
                return None
            slot = min(free, key=lambda s: (self._ref[s] is not None, self._used_at[s]))
            old = self._ref[slot]
            if old is not None:
                del self._slot_of[old]
            began = time.perf_counter()
            try:
                self.slots.load(slot, weights)
            except Exception as e:  # a bad adapter fails its request only
                self._ref[slot] = None
                self.slots.clear(slot)
                self._loaded(ref, began, False)
                raise RequestFailedError(f"cannot load adapter {ref!r}: {e}") from e
            self._loaded(ref, began, True)
            self._ref[slot] = ref
            self._slot_of[ref] = slot
        self._users[slot] += 1
        self._used_at[slot] = time.monotonic()
        return slot

    def release(self, slot: int) -> None:
        """One user of ``slot`` is done; the weights stay for reuse."""
        self._users[slot] -= 1
        self._used_at[slot] = time.monotonic()

    def snapshot(self) -> list[dict[str, Any]]:
        """Per slot: the adapter ref it holds (None = empty) and its users."""
        return [{"ref": ref, "users": users} for ref, users in zip(self._ref, self._users, strict=True)]

    def _loaded(self, ref: str, began: float, ok: bool) -> None:
        if self._on_load is not None:
            self._on_load(ref, time.perf_counter() - began, ok)


__all__ = ["SlotPool"]
