"""The reserve/settle arithmetic, in Python (SQLite and the in-memory fallback).

relay/lua/keys_reserve.lua and keys_settle.lua do the same steps in the
same order on Redis, so every backend decides alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .store import Reservation, ReserveResult

__all__ = ["KeyState", "apply_settlement", "decide"]

_EPSILON = 1e-9  # float slack on the budget comparison


@dataclass(slots=True)
class KeyState:
    period: int = 0
    spend: float = 0.0
    prompt: int = 0
    completion: int = 0
    requests: int = 0
    rpm_tokens: float = -1.0  # -1: a full bucket (never used yet)
    rpm_ts: float = 0.0
    tpm_tokens: float = -1.0
    tpm_ts: float = 0.0
    reserved: float = 0.0  # USD held by outstanding reservations


def _refill(tokens: float, ts: float, capacity: int, now: float) -> tuple[float, float]:
    if tokens < 0 and ts == 0.0:
        return float(capacity), now
    elapsed = now - ts
    if elapsed > 0:
        tokens = min(float(capacity), tokens + elapsed * capacity / 60.0)
        ts = now
    return tokens, ts


def decide(
    state: KeyState,
    budget: float | None,
    rpm: int | None,
    tpm: int | None,
    reservation: Reservation,
    now: float,
) -> ReserveResult:
    """Grant (and apply to ``state``) or refuse one reservation."""
    # A newer period starts from zero; a request stamped with an older one
    # (a clock behind the store's) counts against the current period.
    spend = state.spend if state.period >= reservation.period else 0.0
    committed = spend + state.reserved
    rpm_left = tpm_left = -1
    rpm_reset = tpm_reset = 0.0
    rpm_tokens, rpm_ts = state.rpm_tokens, state.rpm_ts
    tpm_tokens, tpm_ts = state.tpm_tokens, state.tpm_ts
    if rpm:
        rpm_tokens, rpm_ts = _refill(rpm_tokens, rpm_ts, rpm, now)
        rpm_left = max(0, math.floor(rpm_tokens))
        rpm_reset = (rpm - rpm_tokens) * 60.0 / rpm
    if tpm:
        tpm_tokens, tpm_ts = _refill(tpm_tokens, tpm_ts, tpm, now)
        tpm_left = max(0, math.floor(tpm_tokens))
        tpm_reset = (tpm - tpm_tokens) * 60.0 / tpm
    if budget is not None and committed + reservation.cost > budget + _EPSILON:
        return ReserveResult("budget", 0.0, rpm_left, tpm_left, rpm_reset, tpm_reset, committed, spend)
    if rpm and rpm_tokens < reservation.requests:
        retry = (min(reservation.requests, rpm) - rpm_tokens) * 60.0 / rpm
        return ReserveResult("rpm", retry, 0, tpm_left, rpm_reset, tpm_reset, committed, spend)
    if tpm and tpm_tokens < reservation.tokens:
        need = min(float(reservation.tokens), float(tpm))
        retry = max(0.0, need - tpm_tokens) * 60.0 / tpm
        if reservation.tokens > tpm:
            retry = 60.0  # never fits: the most a client should wait before giving up
        return ReserveResult("tpm", retry, rpm_left, tpm_left, rpm_reset, tpm_reset, committed, spend)
    if reservation.period > state.period:
        state.period = reservation.period
        state.spend = 0.0
    if rpm:
        rpm_tokens -= reservation.requests
        rpm_left = max(0, math.floor(rpm_tokens))
        rpm_reset = (rpm - rpm_tokens) * 60.0 / rpm
    if tpm:
        tpm_tokens -= reservation.tokens
        tpm_left = max(0, math.floor(tpm_tokens))
        tpm_reset = (tpm - tpm_tokens) * 60.0 / tpm
    state.rpm_tokens, state.rpm_ts = rpm_tokens, rpm_ts
    state.tpm_tokens, state.tpm_ts = tpm_tokens, tpm_ts
    state.reserved += reservation.cost
    return ReserveResult(None, 0.0, rpm_left, tpm_left, rpm_reset, tpm_reset, committed + reservation.cost,
                         state.spend)


def apply_settlement(
    state: KeyState,
    held: tuple[float, int] | None,
    cost: float,
    prompt: int,
    completion: int,
    period: int,
    tpm: int,
    requests: int = 1,
    rpm: int = 0,
    rpm_refund: int = 0,
) -> None:
    """Replace reservations (``held`` = their summed cost and tokens, None
    when none was found) by the exact usage."""
    held_tokens = 0
    if held is not None:
        held_cost, held_tokens = held
        state.reserved = max(0.0, state.reserved - held_cost)
    if tpm and state.tpm_ts != 0.0:
        # Unused reserved tokens go back; tokens used beyond (or without) a
        # reservation are taken now.
        state.tpm_tokens = min(float(tpm), state.tpm_tokens + held_tokens - (prompt + completion))
    if rpm and rpm_refund and state.rpm_ts != 0.0:
        state.rpm_tokens = min(float(rpm), state.rpm_tokens + rpm_refund)
    if period > state.period:
        state.period = period
        state.spend = 0.0
    state.spend += cost  # late usage of an older period counts in the current one
    state.prompt += prompt
    state.completion += completion
    state.requests += requests
