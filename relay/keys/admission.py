"""Admission of a proxied request by its relay key, and the settle at its end.

Per request, when ``keys.enabled``::

    secret (Authorization: Bearer rk-... | x-api-key: rk-...)
      -> record from the process cache (401 invalid_api_key: missing,
         unknown, revoked, expired)
      -> model globs (403 model_not_allowed)
      -> reserve estimated prompt tokens + max output tokens and their cost
         (403 budget_exceeded; 429 over rpm/tpm with Retry-After and
         OpenAI's x-ratelimit-* headers)
      -> the client's credential headers (the relay key) are dropped from
         what goes upstream

At the end :meth:`KeyTicket.settle` replaces the reservation with the
exact usage (a cache hit: nothing); :meth:`KeyTicket.release` gives back a
reservation that was never used (the client left before the send).
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import TYPE_CHECKING

from relay.accounting.cost import PriceTable
from relay.accounting.usage import Usage, request_text_for_estimate
from relay.http import errors

from .model import KeyRecord, period_start
from .service import Allowance, KeyService
from .store import Reservation, ReserveResult

if TYPE_CHECKING:
    from relay.http.request import Request
    from relay.ops.metrics import Metrics, RequestMetricsOff

__all__ = ["Admission", "KeyTicket"]

_PREFIX = b"rk-"
_EMBEDDINGS = b"/embeddings"
_HASH_MEMO_MAX = 4096
_WHOLE_BODY_ESTIMATE = 16384
# Past one period's start by this much is always within the next period.
_PERIOD_SPAN = {"daily": 86400.0, "weekly": 7 * 86400.0, "monthly": 32 * 86400.0}


def _invalid(message: str) -> errors.GatewayError:
    return errors.GatewayError(401, message, "invalid_request_error", "invalid_api_key")


def reset_text(seconds: float) -> str:
    """A duration the way OpenAI writes x-ratelimit-reset-*: 20ms, 1s, 6m0s."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60.0)
    rest_text = f"{round(rest, 3):g}s"
    return f"{int(minutes)}m{rest_text}" if minutes else rest_text


class KeyTicket:
    """One admitted request's key and reservation, settled exactly once."""

    __slots__ = ("record", "allowance", "local", "settled", "identity", "_admission")

    def __init__(
        self,
        admission: Admission,
        record: KeyRecord,
        allowance: Allowance | None,
        local: Reservation | None,
    ) -> None:
        self._admission = admission
        self.record = record
        self.allowance = allowance  # the process allowance it was drawn from
        self.local = local  # what was held locally while the store was away
        self.settled = False
        # The caller identity for the cache scope and rate limits: the key's
        # id (stable across rotations), never the secret.
        self.identity = record.identity

    @property
    def name(self) -> str:
        return self.record.name

    def settle(self, usage: Usage | None, cost: float) -> None:
        """Replace the reservation with what the request really used."""
        if self.settled:
            return
        self.settled = True
        # All here, without a hop through Admission: this runs once per keyed request.
        admission = self._admission
        record = self.record
        if cost:
            admission._metrics.key_spend(record.name, cost)
        if usage is None:
            prompt = completion = 0
        else:
            prompt = usage.prompt_tokens
            completion = usage.completion_tokens
        admission.service.settle(
            record, self.allowance, self.local, cost, prompt, completion,
            admission._period(record) if record.budget_period else 0,
        )

    def release(self) -> None:
        """Give the reservation back unused (nothing was sent upstream)."""
        if not self.settled:
            self.settle(None, 0.0)


class Admission:
    """Key checks and reservations for one config generation."""

    def __init__(
        self,
        service: KeyService,
        prices: PriceTable,
        default_reserve_tokens: int,
        metrics: Metrics | RequestMetricsOff,
    ) -> None:
        self.service = service
        self._prices = prices
        self._default_reserve = default_reserve_tokens
        self._metrics = metrics
        self._hashes: dict[bytes, str] = {}
        # budget_period -> (start of the current period, start of the next):
        # the calendar is worked out when a period turns, not per request.
        self._periods: dict[str, tuple[int, float]] = {}
        service.start()

    def _period(self, record: KeyRecord) -> int:
        """Start of the current budget period of *record* (0: lifetime)."""
        kind = record.budget_period
        if not kind:
            return 0
        now = time.time()
        known = self._periods.get(kind)
        if known is None or not known[1] > now >= known[0]:
            start = period_start(kind, now)
            # The next period starts at the first calendar start past this
            # one's longest span (a day, a week, 31 days).
            known = self._periods[kind] = (
                start, period_start(kind, start + _PERIOD_SPAN.get(kind, 86400.0))
            )
        return known[0]

    def _hash(self, secret: bytes) -> str:
        known = self._hashes.get(secret)
        if known is None:
            if len(self._hashes) >= _HASH_MEMO_MAX:
                self._hashes.clear()
            known = self._hashes[secret] = hashlib.sha256(secret).hexdigest()
        return known

    def _reject(self, record: KeyRecord | None, reason: str, error: errors.GatewayError) -> errors.GatewayError:
        self._metrics.key_reject(record.name if record is not None else "unknown", reason)
        return error

    def admit_now(self, request: Request) -> KeyTicket | errors.GatewayError | None:
        """:meth:`admit` without waiting, for the usual request: a key in the
        process cache whose allowance covers it. None when the store must be
        asked (an uncached key, an allowance to renew); nothing is counted then."""
        secret = request.credential
        if not secret or not secret.startswith(_PREFIX):
            return self._missing()
        sha = self._hashes.get(secret)
        record = self.service.cached(sha if sha is not None else self._hash(secret))
        if record is None:
            return None
        if record.revoked or record.expires_at is not None or record.models is not None:
            refused = self._refused(request, record)
            if refused is not None:
                return refused
        allowance = None
        if record.reserves:
            tokens, cost = self._estimate(request, record)
            allowance = self.service.reserve_now(
                record, tokens, cost, self._period(record) if record.budget_period else 0
            )
            if allowance is None:
                return None
        request.credential_headers = b""  # consumed here: see admit
        return KeyTicket(self, record, allowance, None)

    async def admit(self, request: Request) -> KeyTicket | errors.GatewayError:
        """A ticket for an admitted request, else the error to answer with."""
        ticket = self.admit_now(request)
        if ticket is not None:
            return ticket
        secret = request.credential
        if not secret or not secret.startswith(_PREFIX):
            return self._missing()
        sha = self._hash(secret)
        service = self.service
        record = service.cached(sha) or await service.lookup(sha)
        if record is None:
            return self._reject(None, "invalid", _invalid("Invalid relay key (unknown)"))
        refused = self._refused(request, record)
        if refused is not None:
            return refused
        allowance = local = None
        if record.reserves:
            tokens, cost = self._estimate(request, record)
            refusal, allowance, local = await service.reserve(
                record, tokens, cost, self._period(record)
            )
            if refusal is not None:
                return self._refusal(record, refusal)
        # The relay key is consumed here: the client's credential headers
        # never go upstream (the upstream's own key, if any, is sent instead).
        request.credential_headers = b""
        return KeyTicket(self, record, allowance, local)

    def _missing(self) -> errors.GatewayError:
        return self._reject(None, "invalid", _invalid(
            "Missing relay key: send it as 'Authorization: Bearer rk-...' or 'x-api-key: rk-...'"
        ))

    def _refused(self, request: Request, record: KeyRecord) -> errors.GatewayError | None:
        """The error for a revoked or expired key, or a model it may not use."""
        if record.revoked or (record.expires_at is not None and record.expires_at <= time.time()):
            why = "revoked" if record.revoked else "expired"
            return self._reject(None, "invalid", _invalid(f"Invalid relay key ({why})"))
        if record.models is not None:
            # From the body's facts scan (what json.loads would give, without
            # decoding the rest of the body).
            model = request.model()
            if not record.model_allowed(model):
                return self._reject(record, "model", errors.GatewayError(
                    403,
                    f"Model {model!r} is not allowed for relay key {record.name!r}",
                    "permission_error",
                    "model_not_allowed",
                ))
        return None

    def _estimate(self, request: Request, record: KeyRecord) -> tuple[int, float]:
        """Prompt tokens (a generous byte-based estimate) plus the most output
        the request allows, and what they would cost (priced by the model
        only when the key has a budget, model globs or a tpm)."""
        output = 0
        facts = None
        if not request.path.endswith(_EMBEDDINGS):
            output = self._default_reserve
            facts = request.facts()  # the one scan, shared with routing and usage
            # The first limit given, in this order (Chat's newer name, the
            # Responses API's, then max_tokens of Chat and Anthropic).
            value = facts.max_completion_tokens
            if value is None or value < 0:
                value = facts.max_output_tokens
                if value is None or value < 0:
                    value = facts.max_tokens
            if value is not None and value >= 0:
                output = value
        model = None
        if record.models is not None or record.budget_usd is not None or record.tpm is not None:
            model = (facts if facts is not None else request.facts()).model
        body = request.body
        # About three bytes per token is more than tokenizers use for
        # ordinary text, so the reservation rarely falls short; the exact
        # usage replaces it at the end anyway. A small body is measured
        # whole (JSON syntax included: an overestimate, at no cost); a large
        # one by its text only, so images and files do not count.
        if len(body) <= _WHOLE_BODY_ESTIMATE:
            size = len(body)
        else:
            size = len(request_text_for_estimate(body, request.json()).encode("utf-8", "replace"))
        prompt = (size + 2) // 3 + 8 if size else 0
        cost = 0.0
        if model:
            price = self._prices.lookup(model)
            if price is not None:
                # price_cost(price, prompt, output) without its cache-token
                # terms (zero here): the same float, fewer steps.
                cost = prompt / 1000 * price.input + output / 1000 * price.output
        return prompt + output, cost

    def _refusal(self, record: KeyRecord, result: ReserveResult) -> errors.GatewayError:
        reason = result.reason or "budget"
        if reason == "budget":
            period = record.budget_period or "lifetime"
            return self._reject(record, "budget", errors.GatewayError(
                403,
                f"Budget of relay key {record.name!r} is spent "
                f"(${record.budget_usd:g} per {period} period)",
                "insufficient_quota",
                "budget_exceeded",
            ))
        headers: list[tuple[bytes, bytes]] = [
            (b"Retry-After", b"%d" % max(1, math.ceil(result.retry_after)))
        ]
        if record.rpm is not None:
            headers.append((b"x-ratelimit-limit-requests", b"%d" % record.rpm))
            headers.append((b"x-ratelimit-remaining-requests", b"%d" % max(0, result.rpm_remaining)))
            headers.append((b"x-ratelimit-reset-requests", reset_text(result.rpm_reset).encode()))
        if record.tpm is not None:
            headers.append((b"x-ratelimit-limit-tokens", b"%d" % record.tpm))
            headers.append((b"x-ratelimit-remaining-tokens", b"%d" % max(0, result.tpm_remaining)))
            headers.append((b"x-ratelimit-reset-tokens", reset_text(result.tpm_reset).encode()))
        limit = "requests" if reason == "rpm" else "tokens"
        return self._reject(record, reason, errors.GatewayError(
            429,
            f"Rate limit of relay key {record.name!r} reached ({limit} per minute): "
            "retry after the time in Retry-After",
            "rate_limit_error",
            "rate_limit_exceeded",
            headers=tuple(headers),
        ))
