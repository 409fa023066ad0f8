"""One rate limit per gateway connection: requests per second and requests in flight.

Every HTTP request of a gateway hook (token, charge, lookup, cancel, listing pages) asks
:meth:`Limiter.acquire` before it is sent and reports how it went with :meth:`Limiter.release`.
With ``rate_limit_redis_conn_id`` the state lives on that Redis (the deployment's Celery
broker), so the limit holds across every task and worker; without it each process keeps its
own (:class:`LocalLimiter`), which is NOT shared.

- Rate: a reservation per request (GCRA): each acquire takes the next start slot, spaced
  1/rate apart, and sleeps until it. A thread that wakes late (a loaded machine) then confirms
  against a sliding window of the starts of the last second, so late sleepers cannot bunch up:
  no one-second window holds more than the rate.
- In flight: a semaphore of leased tokens; a token of a killed worker frees itself after the
  lease (the hook's connect + read timeout and a margin).
- Adaptive (AIMD): a 429, a 5xx or a latency far above its running baseline cuts the rate by
  DECREASE, at most once per CUT_EVERY_S, so 32 threads seeing the same trouble cut it once;
  a 429 also cuts it to DECREASE x what the gateway accepted over the last second (a measured
  capacity). Without trouble it climbs back quickly to near the rate of the last cut, then
  slowly (probing), up to the configured limit; never below FLOOR x the limit.

Every wait is bounded by MAX_WAIT_S (well inside the ledger's 300-s pending lease): a request
that would wait longer, or a Redis that cannot be reached, raises :class:`NotAdmitted` before
anything is sent (fail closed: a silent per-process fallback would multiply the limit by the
number of workers).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

KEY_PREFIX = "iamport_billing:rate:"
# No request waits longer than this for its turn; it is refused (not sent) instead.
MAX_WAIT_S = 30.0
# An in-flight token outlives the request's own timeouts by this much before it frees itself.
LEASE_MARGIN_S = 10.0
# Redis keys of an idle connection disappear after this long.
KEY_TTL_S = 3600
# Adaptive rate: cut to DECREASE x, at most once per CUT_EVERY_S, never below FLOOR x limit;
# recover at FAST x the last cut's rate per second up to RECOVERED x it, SLOW x beyond.
DECREASE = 0.9
CUT_EVERY_S = 1.0
FLOOR = 0.05
FAST = 0.05
SLOW = 0.005
RECOVERED = 0.95
# A reply slower than SLOW_FACTOR x the baseline and SLOW_MARGIN_S above it is trouble.
SLOW_FACTOR = 3.0
SLOW_MARGIN_S = 1.0
BASELINE_WEIGHT = 0.05
# A Redis that does not answer within this long refuses the request (fail closed).
SOCKET_TIMEOUT_S = 2.0
# How often a request waiting for an in-flight slot looks again.
POLL_S = 0.02

# Verdicts of a reply, reported by the hooks.
OK = 0
REFUSED = 1  # 429: over the gateway's rate
TROUBLE = 2  # 5xx, no reply, or the like: back off


class NotAdmitted(Exception):
    """The limiter did not let the request go (waited too long, or cannot ask Redis):
    nothing was sent."""


@dataclass(frozen=True)
class RateLimitSettings:
    """The connection extras of the limit; empty means no limit."""

    requests_per_second: float | None = None
    max_in_flight: int | None = None
    redis_conn_id: str | None = None
    adaptive: bool = True

    @property
    def active(self) -> bool:
        return bool(self.requests_per_second or self.max_in_flight)


@dataclass(frozen=True)
class Permit:
    """One admitted request: its in-flight token and when it started."""

    token: str
    started: float


class Limiter(ABC):
    """The interface the hooks use; one instance per connection and process."""

    def __init__(self, settings: RateLimitSettings, lease_s: float, max_wait_s: float):
        self.settings = settings
        self.limit = settings.requests_per_second or 0.0
        self.adaptive = bool(self.limit) and settings.adaptive
        self.lease_s = lease_s
        self.max_wait_s = max_wait_s

    def acquire(self) -> Permit:
        """Wait for this request's turn (bounded); raises NotAdmitted when it is refused."""
        deadline = time.monotonic() + self.max_wait_s
        token = uuid.uuid4().hex
        if self.settings.max_in_flight:
            while not self._enter(token):
                _sleep_before(deadline, POLL_S * random.uniform(0.5, 1.5), "an in-flight slot")
        try:
            if self.limit:
                # Only within what is left of the bound: an in-flight wait counts against it.
                left = max(0.0, deadline - time.monotonic())
                delay = self._reserve(left)
                if delay > left:
                    raise NotAdmitted(
                        f"the next request slot is {delay:.1f} s away (past the "
                        f"{self.max_wait_s:.0f}-s bound): raise requests_per_second or lower "
                        "the concurrency"
                    )
                time.sleep(delay)
                while (wait := self._confirm(token)) > 0:
                    _sleep_before(deadline, wait + random.uniform(0, 0.005), "a request slot")
        except BaseException:
            self._leave(token)
            raise
        return Permit(token, time.monotonic())

    def release(self, permit: Permit, verdict: int) -> None:
        """Report how the request went (``OK``, ``REFUSED``, ``TROUBLE``); never raises."""
        try:
            self._report(permit.token, verdict, time.monotonic() - permit.started)
        except Exception as e:
            log.warning("Rate limiter could not record a finished request: %s", e)

    @abstractmethod
    def _enter(self, token: str) -> bool:
        """Take an in-flight slot; False when all are taken."""

    @abstractmethod
    def _leave(self, token: str) -> None:
        """Give an in-flight slot back (a no-op for one never taken)."""

    @abstractmethod
    def _reserve(self, max_wait_s: float) -> float:
        """Seconds until this request's start slot; reserved unless more than max_wait_s."""

    @abstractmethod
    def _confirm(self, token: str) -> float:
        """0 when the start is recorded, else seconds until the window has room."""

    @abstractmethod
    def _report(self, token: str, verdict: int, latency_s: float) -> None:
        """Leave the in-flight slot and adapt the rate."""


def _sleep_before(deadline: float, seconds: float, what: str) -> None:
    if time.monotonic() + seconds > deadline:
        raise NotAdmitted(f"no {what} within {MAX_WAIT_S:.0f} s: the limit is saturated")
    time.sleep(seconds)


class LocalLimiter(Limiter):
    """The limit within this process only (no ``rate_limit_redis_conn_id``)."""

    def __init__(self, settings: RateLimitSettings, lease_s: float, max_wait_s: float):
        super().__init__(settings, lease_s, max_wait_s)
        self._lock = threading.Lock()
        self._flight: set[str] = set()
        self._starts: list[float] = []
        self._tat = 0.0
        self._rate = self._ceiling = self.limit
        self._updated = self._cut = 0.0
        self._baseline: float | None = None
        self._ok_second, self._ok_now, self._ok_before = 0, 0, 0

    def _enter(self, token: str) -> bool:
        with self._lock:
            if len(self._flight) >= (self.settings.max_in_flight or 0):
                return False
            self._flight.add(token)
            return True

    def _leave(self, token: str) -> None:
        with self._lock:
            self._flight.discard(token)

    def _current_rate(self, now: float) -> float:
        if self.adaptive and self._updated:
            speed = FAST if self._rate < RECOVERED * self._ceiling else SLOW
            self._rate = min(self.limit, self._rate + speed * self._ceiling * (now - self._updated))
            self._ceiling = max(self._ceiling, self._rate)
        self._updated = now
        return self._rate

    def _reserve(self, max_wait_s: float) -> float:
        with self._lock:
            now = time.monotonic()
            slot = max(self._tat, now)
            if slot - now <= max_wait_s:
                self._tat = slot + 1 / self._current_rate(now)
            return slot - now

    def _confirm(self, token: str) -> float:
        with self._lock:
            now = time.monotonic()
            self._starts = [t for t in self._starts if t > now - 1]
            if len(self._starts) < max(1, math.floor(self._current_rate(now))):
                self._starts.append(now)
                return 0.0
            return self._starts[0] + 1 - now

    def _report(self, token: str, verdict: int, latency_s: float) -> None:
        with self._lock:
            self._flight.discard(token)
            if not self.adaptive:
                return
            now = time.monotonic()
            rate = self._current_rate(now)
            second = math.floor(now)
            if verdict == OK:
                if second != self._ok_second:
                    before = self._ok_now if second == self._ok_second + 1 else 0
                    self._ok_second, self._ok_now, self._ok_before = second, 0, before
                self._ok_now += 1
                base = self._baseline
                if base is not None and _slow(latency_s, base):
                    verdict = TROUBLE
                self._baseline = latency_s if base is None else _blend(base, latency_s)
            if verdict == OK or now - self._cut < CUT_EVERY_S:
                return
            accepted = 0
            if verdict == REFUSED:
                accepted = max(_accepted(second, self._ok_second, self._ok_now, self._ok_before))
            self._rate, self._ceiling = _cut(rate, accepted, self.limit)
            self._cut = now


def _slow(latency_s: float, baseline: float) -> bool:
    return latency_s > SLOW_FACTOR * baseline and latency_s > baseline + SLOW_MARGIN_S


def _blend(baseline: float, latency_s: float) -> float:
    return baseline + BASELINE_WEIGHT * (latency_s - baseline)


def _accepted(second: int, ok_second: int, ok_now: int, ok_before: int) -> tuple[int, int]:
    """Requests the gateway accepted in this second and the one before."""
    if ok_second == second:
        return ok_now, ok_before
    return 0, ok_now if ok_second == second - 1 else 0


def _cut(rate: float, accepted: int, limit: float) -> tuple[float, float]:
    """The rate and the ceiling after trouble (``accepted`` > 0: a 429 with a measure)."""
    ceiling = float(accepted) if accepted else rate
    new = DECREASE * min(rate, ceiling)
    return max(FLOOR * limit, new), max(FLOOR * limit, ceiling)


# -- Redis: the same algorithm as LocalLimiter, atomic in Lua on the server's clock ----------

_PRELUDE = f"""
local function num(x)
  return string.format('%.6f', x)
end
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function current_rate(key, limit, adaptive, now)
  local s = redis.call('HMGET', key, 'limit', 'rate', 'upd', 'ceil')
  local rate, upd, ceil = tonumber(s[2]), tonumber(s[3]), tonumber(s[4])
  -- compared as stored: a limit with more than 6 decimals must not reset the state each call
  if s[1] ~= num(limit) or rate == nil then
    rate, ceil = limit, limit
    redis.call('HDEL', key, 'tat', 'cut')
  elseif adaptive == 1 then
    local speed = {SLOW}
    if rate < {RECOVERED} * ceil then speed = {FAST} end
    rate = math.min(limit, rate + speed * ceil * math.max(0, now - upd))
    ceil = math.max(ceil, rate)
  else
    rate = limit
  end
  redis.call('HSET', key, 'limit', num(limit), 'rate', num(rate),
             'upd', num(now), 'ceil', num(ceil))
  redis.call('EXPIRE', key, {KEY_TTL_S})
  return rate
end
"""

# KEYS: state. ARGV: limit, adaptive, max_wait. Returns the delay (reserved unless > max_wait).
_RESERVE = (
    _PRELUDE
    + """
local now = now_s()
local rate = current_rate(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), now)
local slot = math.max(tonumber(redis.call('HGET', KEYS[1], 'tat') or 0), now)
if slot - now <= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'tat', num(slot + 1 / rate))
end
return num(slot - now)
"""
)

# KEYS: state, starts. ARGV: limit, adaptive, token. 0 = recorded, else seconds to wait.
_CONFIRM = (
    _PRELUDE
    + f"""
local now = now_s()
local rate = current_rate(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 1)
if redis.call('ZCARD', KEYS[2]) < math.max(1, math.floor(rate)) then
  redis.call('ZADD', KEYS[2], now, ARGV[3])
  redis.call('EXPIRE', KEYS[2], {KEY_TTL_S})
  return '0'
end
local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
return num(tonumber(oldest[2]) + 1 - now)
"""
)

# KEYS: in flight. ARGV: max, token, lease. 1 = taken.
_ENTER = f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
  redis.call('EXPIRE', KEYS[1], {KEY_TTL_S})
  return 1
end
return 0
"""

# KEYS: state, in flight. ARGV: token, verdict, latency, limit, adaptive.
_REPORT = (
    _PRELUDE
    + f"""
redis.call('ZREM', KEYS[2], ARGV[1])
if tonumber(ARGV[5]) ~= 1 then return 0 end
local now = now_s()
local limit = tonumber(ARGV[4])
local rate = current_rate(KEYS[1], limit, 1, now)
local verdict, latency = tonumber(ARGV[2]), tonumber(ARGV[3])
local s = redis.call('HMGET', KEYS[1], 'base', 'oks', 'okn', 'okp', 'cut')
local base, oks = tonumber(s[1]), tonumber(s[2]) or 0
local okn, okp, cut = tonumber(s[3]) or 0, tonumber(s[4]) or 0, tonumber(s[5]) or 0
local second = math.floor(now)
if verdict == 0 then
  if second ~= oks then
    if second == oks + 1 then okp = okn else okp = 0 end
    oks, okn = second, 0
  end
  okn = okn + 1
  if base and latency > {SLOW_FACTOR} * base and latency > base + {SLOW_MARGIN_S} then
    verdict = 2
  end
  if base then base = base + {BASELINE_WEIGHT} * (latency - base) else base = latency end
  redis.call('HSET', KEYS[1], 'base', num(base), 'oks', oks, 'okn', okn, 'okp', okp)
end
if verdict == 0 or now - cut < {CUT_EVERY_S} then return 0 end
local accepted = 0
if verdict == 1 then
  if oks == second then accepted = math.max(okn, okp)
  elseif oks == second - 1 then accepted = okn end
end
local ceil = rate
if accepted > 0 then ceil = accepted end
local floor = {FLOOR} * limit
local new = math.max(floor, {DECREASE} * math.min(rate, ceil))
redis.call('HSET', KEYS[1], 'rate', num(new), 'ceil', num(math.max(floor, ceil)),
           'cut', num(now))
return 1
"""
)


class RedisLimiter(Limiter):
    """The limit shared through Redis by every process that uses the connection."""

    def __init__(
        self,
        conn_id: str,
        settings: RateLimitSettings,
        lease_s: float,
        max_wait_s: float,
        client: Any = None,
    ):
        super().__init__(settings, lease_s, max_wait_s)
        prefix = f"{KEY_PREFIX}{conn_id}:"
        self.keys = {"state": prefix + "state", "starts": prefix + "starts"}
        self.keys["flight"] = prefix + "flight"
        self._client = client
        self._scripts: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _script(self, name: str, source: str) -> Any:
        with self._lock:
            if self._client is None:
                self._client = _redis_client(self.settings.redis_conn_id or "")
            if name not in self._scripts:
                self._scripts[name] = self._client.register_script(source)
            return self._scripts[name]

    def _run(self, name: str, source: str, keys: list[str], args: list[Any]) -> Any:
        from redis.exceptions import RedisError

        try:
            return self._script(name, source)(keys=[self.keys[k] for k in keys], args=args)
        except RedisError as e:
            raise NotAdmitted(
                f"the rate limiter's Redis ({self.settings.redis_conn_id}) cannot be reached "
                f"({type(e).__name__}): nothing was sent"
            ) from None

    def _enter(self, token: str) -> bool:
        args = [self.settings.max_in_flight, token, self.lease_s]
        return bool(self._run("enter", _ENTER, ["flight"], args))

    def _leave(self, token: str) -> None:
        if self.settings.max_in_flight:
            try:
                self._run("report", _REPORT, ["state", "flight"], [token, OK, 0, 0, 0])
            except NotAdmitted as e:  # the lease frees it
                log.warning("%s", e)

    def _reserve(self, max_wait_s: float) -> float:
        args = [self.limit, int(self.adaptive), max_wait_s]
        return float(self._run("reserve", _RESERVE, ["state"], args))

    def _confirm(self, token: str) -> float:
        args = [self.limit, int(self.adaptive), token]
        return float(self._run("confirm", _CONFIRM, ["state", "starts"], args))

    def _report(self, token: str, verdict: int, latency_s: float) -> None:
        if not (self.settings.max_in_flight or self.adaptive):
            return
        args = [token, verdict, latency_s, self.limit, int(self.adaptive)]
        self._run("report", _REPORT, ["state", "flight"], args)


def _redis_client(redis_conn_id: str) -> Any:
    """The Airflow ``redis`` connection's client, with bounded socket timeouts (a hung Redis
    must refuse the request, not hang it)."""
    from airflow.providers.redis.hooks.redis import RedisHook

    try:
        client = RedisHook(redis_conn_id=redis_conn_id).get_conn()
    except Exception as e:
        raise NotAdmitted(
            f"the rate limiter's Redis connection {redis_conn_id!r} is unusable "
            f"({type(e).__name__}): nothing was sent"
        ) from None
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)
    if isinstance(kwargs, dict):
        # redis-py stores None for "no timeout" (the hook passes none): setdefault would keep it.
        for name in ("socket_timeout", "socket_connect_timeout"):
            kwargs[name] = kwargs.get(name) or SOCKET_TIMEOUT_S
    return client


_LIMITERS: dict[tuple[str, RateLimitSettings, float], Limiter] = {}
_LIMITERS_LOCK = threading.Lock()


def limiter_for(conn_id: str, settings: RateLimitSettings, lease_s: float) -> Limiter | None:
    """The process's limiter of a connection (every hook on it shares one); None: no limit."""
    if not settings.active:
        return None
    key = (conn_id, settings, lease_s)
    with _LIMITERS_LOCK:
        limiter = _LIMITERS.get(key)
        if limiter is None:
            if settings.redis_conn_id:
                limiter = RedisLimiter(conn_id, settings, lease_s, MAX_WAIT_S)
            else:
                limiter = LocalLimiter(settings, lease_s, MAX_WAIT_S)
            _LIMITERS[key] = limiter
        return limiter
