"""The ``redis`` store (the seed's mnesia row): one Redis server shared by many processes.

Layout
------
Under a key prefix (``prefix``, default ``"sessions:"``), a store keeps:

``<prefix>s:<id>``
    the session's msgpack record (:func:`~workers.record.codec.encode_session`), a plain string, so
    :meth:`RedisStore.load` is one ``MGET``. Nothing is ever pickled.
``<prefix>ids``
    a sorted set of every stored id, all scored 0, so that Redis orders it by id: a
    :meth:`~RedisStore.scan` page is one ``ZRANGE ... BYLEX`` from the last id returned (the
    opaque cursor) plus one ``MGET``. ``SCAN`` would need no index, but it may return a key
    twice (when Redis shrinks its table between calls), which the Store protocol forbids.
``<prefix>expiry``
    a sorted set of the ids of the sessions that expire, scored by ``expires_at``:
    :meth:`~RedisStore.expired` is one ``ZRANGE ... BYSCORE`` and :meth:`~RedisStore.count` is
    ``ZCARD ids - ZCOUNT expiry -inf (now``, so neither reads a live session.
``<prefix>mark``
    the clock high-water mark in ms (:class:`~workers.stores.base.Mark`); raised, never
    lowered, inside the commit script. Not a session key: never listed or counted.

Writes
------
:meth:`~RedisStore.commit` sends the whole batch as one ``EVALSHA`` of :data:`COMMIT_SCRIPT`.
Redis runs a script without interleaving any other client's commands, so the checks (a create
needs a free id, a put needs the version it names, a conditional delete needs an expired
session) and the writes of a batch are atomic with respect to every other store object sharing
the server: concurrent read-modify-write cycles from several processes lose nothing, the loser
of a race sees ``False`` and its manager retries. Once a write to an id fails, the later writes
of the batch to that id fail too (the Store protocol's rule): a manager that queued
``Put(v2, expected 1)`` then ``Put(v3, expected 2)`` must not see the second succeed on another
process's version 2. The script does every check before its first write, so an error (an
unreadable record) leaves the store untouched.

Expiry
------
Every write of a session that expires sets the key's own Redis TTL to ``timeout_ms +
expiry_grace`` (``SET ... PX``), so Redis frees an abandoned session even when no service
sweeps, and every write that moves ``last_accessed`` pushes it back. The TTL is relative, set
when the write lands, rather than ``PEXPIREAT expires_at``: the session's times come from the
service's clock (another machine's, or a test's virtual one), and an absolute deadline on
Redis's clock would delete live sessions whenever the two disagree. Redis's expiry is
therefore a backstop that never fires before the session has expired by the service's clock;
which sessions are live is decided by that clock alone (``Session.expired_at``): expired ones
are filtered out of every page and count, and swept through the expiry index. An index entry
whose key Redis already dropped is removed by the sweep's delete (which then reports
``False``: Redis removed that session, not the sweep).

Failures
--------
When Redis cannot be reached, does not answer within ``connect_timeout`` +
``command_timeout``, or is loading its data set, a call raises
:class:`~workers.ServiceUnavailable` promptly and never hangs; other Redis errors (out of memory
under ``maxmemory-policy noeviction``, a read-only replica, a broken record) raise
:class:`~workers.StoreError`. The connection pool reconnects by itself: the first call
after Redis is back succeeds. A commit is never retried by the store, since a commit whose
reply was lost may have been applied; reads are retried once on a dropped connection.

coredis and Trio
----------------
coredis runs on Trio through anyio, but since 6.0 its client must be entered as an async
context manager, which opens a task group (a Trio nursery) for its connections. The Store
protocol has separate ``open`` and ``close`` calls that a manager makes from different
places, and a nursery must be exited by the task that entered it, so the store enters the
client in a Trio *system task* of its own, started by ``open`` and told to leave by ``close``.

Running Redis for sessions
--------------------------
A session store must not lose sessions silently: run Redis with ``maxmemory-policy
noeviction`` (writes then fail with :class:`StoreError` instead of Redis evicting sessions),
with persistence (``appendonly yes``, ``appendfsync everysec`` or ``always``) if sessions must
survive a restart of Redis, and with a replica for availability (a failover may lose the last
acknowledged writes, as Redis replication is asynchronous). Several services (daemons or
embedded) share sessions by using the same URL and ``prefix``; different prefixes (or database
numbers) keep unrelated services apart. All of a store's keys are used together in scripts, so
on Redis Cluster they must hash to one slot: a prefix with a hash tag, like
``"{sessions}:"``, does that (the store itself speaks to a single Redis server).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import coredis
import trio
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.exceptions import RedisError
from coredis.retry import NoRetryPolicy

from ..record.codec import decode_session, encode_session
from ..record.errors import ServiceUnavailable, StoreError
from ..record.session import Session
from .base import Mark, Put, Write, check_limit, check_writes
from .urls import redact_url

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The batch of conditional writes, atomically. See the comments in the script.
COMMIT_SCRIPT = r"""
-- KEYS[1]: the id index; KEYS[2]: the expiry index; KEYS[2 + i]: the key of write i.
-- ARGV, 7 per write: op ('P' put, 'D' delete, 'M' mark: raise the number at its key to the
-- 7th value, never lower it; always takes effect), id, condition (expected version or
-- if_expired_at, '' for none), record, expires_at ('' never), ttl ms ('' none), version.
-- Returns one 0/1 per write. Phase 1 checks every write against the stored state (as changed
-- by the earlier writes of the batch) without writing; phase 2 writes. An error in phase 1
-- (a record it cannot read) therefore leaves the store untouched. Once a write to an id fails,
-- the later writes to that id fail too: they were computed from the state it expected.

-- msgpack integer or nil at position p of s: value (false for nil), next position.
local function mp_int(s, p)
  local b = string.byte(s, p)
  if b <= 0x7f then return b, p + 1 end
  if b >= 0xe0 then return b - 0x100, p + 1 end
  if b == 0xc0 then return false, p + 1 end
  local fmt = ({[0xcc] = '>I1', [0xcd] = '>I2', [0xce] = '>I4', [0xcf] = '>I8',
                [0xd0] = '>i1', [0xd1] = '>i2', [0xd2] = '>i4', [0xd3] = '>i8'})[b]
  if not fmt then error('session record: no integer at byte ' .. p) end
  return struct.unpack(fmt, s, p + 1)
end

-- Position just after the msgpack string at position p of s.
local function mp_str_end(s, p)
  local b = string.byte(s, p)
  if b >= 0xa0 and b <= 0xbf then return p + 1 + b - 0xa0 end
  if b == 0xd9 then return p + 2 + string.byte(s, p + 1) end
  if b == 0xda then return p + 3 + struct.unpack('>I2', s, p + 1) end
  if b == 0xdb then return p + 5 + struct.unpack('>I4', s, p + 1) end
  error('session record: no string at byte ' .. p)
end

-- Version and expires_at (false: never) of a stored record, read from its fixed header
-- [1, id, created_at, last_accessed, timeout_ms, version, metadata] without decoding the
-- metadata (Redis's cmsgpack cannot read msgpack's bin type).
local function header(record)
  if string.byte(record, 1) ~= 0x97 or string.byte(record, 2) ~= 0x01 then
    error('session record of an unknown format')
  end
  local p = mp_str_end(record, 3)
  local last_accessed, timeout, version, _
  _, p = mp_int(record, p)
  last_accessed, p = mp_int(record, p)
  timeout, p = mp_int(record, p)
  version = mp_int(record, p)
  return version, timeout and (last_accessed + timeout)
end

local state, plan, results = {}, {}, {}
for i = 1, #KEYS - 2 do
  local a = (i - 1) * 7
  local op, id, cond = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local s = state[id]
  if op == 'M' then
    s = {}
  elseif s == nil then
    local record = redis.call('GET', KEYS[2 + i])
    s = {version = false, expires = false}
    if record then s.version, s.expires = header(record) end
    state[id] = s
  end
  local ok = false
  if op == 'M' then
    ok = true
    plan[#plan + 1] = i
  elseif s.failed then
    -- An earlier write of the batch to this id did not take effect: neither does this one.
  elseif op == 'P' then
    if cond == '' then ok = not s.version else ok = s.version == tonumber(cond) end
    if ok then
      s.version = tonumber(ARGV[a + 7])
      s.expires = ARGV[a + 5] ~= '' and tonumber(ARGV[a + 5])
      plan[#plan + 1] = i
    end
  elseif s.version then
    ok = cond == '' or (s.expires and s.expires < tonumber(cond))
    if ok then
      s.version, s.expires = false, false
      plan[#plan + 1] = i
    end
  else
    -- Nothing stored (Redis may have expired the key): drop index entries it left behind.
    plan[#plan + 1] = i
  end
  if not ok then s.failed = true end
  results[i] = ok and 1 or 0
end

for _, i in ipairs(plan) do
  local a = (i - 1) * 7
  local key, id = KEYS[2 + i], ARGV[a + 2]
  if ARGV[a + 1] == 'M' then
    local ms = tonumber(ARGV[a + 7])
    if ms > (tonumber(redis.call('GET', key)) or 0) then redis.call('SET', key, ARGV[a + 7]) end
  elseif ARGV[a + 1] == 'P' then
    if ARGV[a + 6] == '' then
      redis.call('SET', key, ARGV[a + 4])
    else
      redis.call('SET', key, ARGV[a + 4], 'PX', ARGV[a + 6])
    end
    redis.call('ZADD', KEYS[1], 0, id)
    if ARGV[a + 5] == '' then
      redis.call('ZREM', KEYS[2], id)
    else
      redis.call('ZADD', KEYS[2], ARGV[a + 5], id)
    end
  else
    redis.call('DEL', key)
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
  end
end
return results
"""

#: Live sessions at ARGV[1]: every id, minus those whose expires_at is before it.
COUNT_SCRIPT = """
return redis.call('ZCARD', KEYS[1]) - redis.call('ZCOUNT', KEYS[2], '-inf', '(' .. ARGV[1])
"""


class RedisStore:
    """Sessions in the Redis server at ``url``, under the key prefix ``prefix``.

    Several store objects, in any number of processes, may use the same server and prefix at
    once: that is how several services share sessions.

    :param url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS) or
        ``unix://[[user]:password@]/path/to/socket?db=N``.
    :param prefix: the start of every key this store uses.
    :param connect_timeout: seconds to establish a connection before giving up.
    :param command_timeout: seconds to wait for Redis to answer one command.
    :param expiry_grace: seconds that Redis keeps an expired session past its idle timeout
        before deleting it by itself (see the module docstring).
    :param create: with False, ``open`` refuses (:class:`StoreError` naming the URL and the
        prefix) a prefix under which no service ever kept sessions: no id index and no clock
        mark. For tools that must not take a typo for an empty store.
    """

    backend = "redis"
    shared = True

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "sessions:",
        connect_timeout: float = 2.0,
        command_timeout: float = 5.0,
        expiry_grace: float = 60.0,
        create: bool = True,
    ) -> None:
        if not prefix:
            raise ValueError("prefix must not be empty: the store would claim every key")
        if connect_timeout <= 0 or command_timeout <= 0 or expiry_grace < 0:
            raise ValueError("timeouts must be positive and expiry_grace not negative")
        self.url = url
        self.prefix = prefix
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.expiry_grace = expiry_grace
        self.create = create
        self._where = redact_url(url)
        self._ids_key = f"{prefix}ids"
        self._expiry_key = f"{prefix}expiry"
        #: The clock high-water mark (:class:`~workers.stores.base.Mark`): a number, in ms.
        self._mark_key = f"{prefix}mark"
        self._session_prefix = f"{prefix}s:"
        self._grace_ms = round(expiry_grace * 1000)
        # Whatever coredis does inside, one call never takes longer than this.
        self._deadline = connect_timeout + command_timeout + 1.0
        self._client: coredis.Redis[bytes] | None = None
        self._commit_script: Any = None
        self._count_script: Any = None
        self._closing: trio.Event | None = None
        self._closed: trio.Event | None = None

    def __repr__(self) -> str:
        return f"RedisStore({self._where!r}, prefix={self.prefix!r})"

    # -- the Store protocol ------------------------------------------------------------------

    async def open(self) -> None:
        """Start the client and PING the server; :class:`StoreError` naming the URL if it fails."""
        if self._closing is not None:
            raise StoreError(f"{self!r} is already open")
        try:
            client = coredis.Redis.from_url(
                self.url,
                connect_timeout=self.connect_timeout,
                stream_timeout=self.command_timeout,
                # Retrying a command whose reply was lost could apply a commit twice; the
                # store decides itself what is safe to retry.
                retry_policy=NoRetryPolicy(),
            )
        except (ValueError, TypeError, RedisError) as exc:
            raise StoreError(f"cannot use Redis URL {self._where}: {exc}") from None
        self._closing, self._closed = trio.Event(), trio.Event()
        ready = trio.Event()
        trio.lowlevel.spawn_system_task(
            self._own_client,
            client,
            ready,
            self._closing,
            self._closed,
            name=f"redis store client {self._where}",
        )
        try:
            await ready.wait()
            if self._client is None:
                raise StoreError(f"cannot start a Redis client for {self._where}")
            try:
                await self._call("PING", lambda c: c.ping(), retry=False)
                if not self.create:
                    await self._check_exists()
            except ServiceUnavailable as exc:
                raise StoreError(f"cannot open the redis store: {exc}") from None
            self._commit_script = client.register_script(COMMIT_SCRIPT)
            self._count_script = client.register_script(COUNT_SCRIPT)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Disconnect from Redis. Idempotent; runs to the end even if the caller is cancelled."""
        closing, closed = self._closing, self._closed
        if closing is None or closed is None:
            return
        self._closing = self._closed = None
        closing.set()
        with trio.CancelScope(shield=True):
            await closed.wait()

    async def load(self, ids: Iterable[str]) -> dict[str, Session]:
        """The stored sessions among ``ids`` (expired ones included), with one ``MGET``."""
        ids = list(dict.fromkeys(ids))
        if not ids:
            return {}
        keys = [self._key(sid) for sid in ids]
        records = await self._call("MGET", lambda c: c.mget(keys), retry=True)
        return {
            sid: decode_session(record)
            for sid, record in zip(ids, records, strict=True)
            if record is not None
        }

    async def commit(self, writes: Sequence[Write]) -> list[bool]:
        """Apply ``writes`` in order, atomically, with one script call; per write, whether it
        took effect. Never retried: on :class:`ServiceUnavailable` the batch may or may not have
        been applied."""
        check_writes(writes)
        if not writes:
            return []
        keys: list[str] = [self._ids_key, self._expiry_key]
        args: list[str | bytes | int] = []
        for write in writes:
            if isinstance(write, Put):
                session = write.session
                keys.append(self._key(session.id))
                args += [
                    "P",
                    session.id,
                    _or_empty(write.expected_version),
                    encode_session(session),
                    _or_empty(session.expires_at),
                    "" if session.timeout_ms is None else session.timeout_ms + self._grace_ms,
                    session.version,
                ]
            elif isinstance(write, Mark):
                keys.append(self._mark_key)
                args += ["M", "", "", "", "", "", write.ms]
            else:
                keys.append(self._key(write.id))
                args += ["D", write.id, _or_empty(write.if_expired_at), "", "", "", ""]
        script = self._commit_script
        results = await self._call(
            "commit", lambda c: script(keys=keys, args=args, client=c), retry=False
        )
        return [bool(ok) for ok in results]

    async def scan(
        self, now_ms: int, cursor: str | None, limit: int
    ) -> tuple[list[Session], str | None]:
        """Up to ``limit`` live sessions with ids after ``cursor``, in id order."""
        check_limit(limit)
        page: list[Session] = []
        after = cursor
        while True:
            start = "-" if after is None else "(" + after
            members = await self._call(
                "ZRANGE",
                lambda c, start=start: c.zrange(
                    self._ids_key, start, "+", sortby=coredis.PureToken.BYLEX, offset=0, count=limit
                ),
                retry=True,
            )
            ids = [member.decode() for member in members]
            found = await self.load(ids)
            for sid in ids:
                session = found.get(sid)
                if session is not None and not session.expired_at(now_ms):
                    page.append(session)
                    if len(page) == limit:
                        return page, sid
            if len(ids) < limit:
                return page, None
            after = ids[-1]

    async def expired(self, now_ms: int, limit: int) -> list[str]:
        """Up to ``limit`` ids of sessions expired at ``now_ms``, soonest expired first."""
        check_limit(limit)
        members = await self._call(
            "ZRANGE",
            lambda c: c.zrange(
                self._expiry_key,
                "-inf",
                f"({now_ms}",
                sortby=coredis.PureToken.BYSCORE,
                offset=0,
                count=limit,
            ),
            retry=True,
        )
        return [member.decode() for member in members]

    async def load_mark(self) -> int:
        """The clock high-water mark (the highest Mark any store committed here), 0 if none."""
        value = await self._call("GET", lambda c: c.get(self._mark_key), retry=True)
        return 0 if value is None else int(value)

    async def count(self, now_ms: int) -> int:
        """The number of live sessions at ``now_ms``, from the two indexes."""
        script = self._count_script
        return int(
            await self._call(
                "count",
                lambda c: script(keys=[self._ids_key, self._expiry_key], args=[now_ms], client=c),
                retry=True,
            )
        )

    # -- internals ---------------------------------------------------------------------------

    async def _check_exists(self) -> None:
        """StoreError unless a service kept sessions under the prefix (an index or a mark)."""
        keys = [self._ids_key, self._mark_key]
        if not await self._call("EXISTS", lambda c: c.exists(keys), retry=True):
            raise StoreError(
                f"no redis store at {self._where} under prefix {self.prefix!r}: no session "
                "was ever kept there (check --url and --prefix)"
            )

    def _key(self, session_id: str) -> str:
        return self._session_prefix + session_id

    async def _own_client(
        self,
        client: coredis.Redis[bytes],
        ready: trio.Event,
        closing: trio.Event,
        closed: trio.Event,
    ) -> None:
        try:
            async with client:
                self._client = client
                ready.set()
                await closing.wait()
        except Exception:
            # An exception out of a system task would crash the whole Trio run: report it
            # here; the store's calls fail with StoreError from now on.
            log.exception("the Redis client of %r stopped", self)
        finally:
            self._client = None
            ready.set()
            closed.set()

    async def _call(
        self, what: str, command: Callable[[coredis.Redis[bytes]], Awaitable[T]], *, retry: bool
    ) -> T:
        """Run ``command(client)``, mapping failures to the service's errors.

        With ``retry``, a dropped connection is retried once: a pooled connection that died
        since its last use (Redis restarted between two calls) fails once, and the retry gets
        a new one. Only for reads: a commit whose reply was lost may have been applied.
        """
        try:
            return await self._send(what, command)
        except RedisConnectionError as exc:
            error = exc
        if retry:
            try:
                return await self._send(what, command)
            except RedisConnectionError as exc:
                error = exc
        raise ServiceUnavailable(f"Redis at {self._where} is unreachable ({error})") from None

    async def _send(self, what: str, command: Callable[[coredis.Redis[bytes]], Awaitable[T]]) -> T:
        client = self._client
        if client is None:
            raise StoreError(f"{self!r} is not open (or its client stopped)")
        try:
            with trio.fail_after(self._deadline):
                return await command(client)
        except trio.TooSlowError:
            raise ServiceUnavailable(
                f"Redis at {self._where} did not answer {what} within {self._deadline:g} s"
            ) from None
        except RedisConnectionError:
            raise
        except (TimeoutError, OSError) as exc:
            raise ServiceUnavailable(f"Redis at {self._where} is unreachable ({exc})") from None
        except RedisError as exc:
            raise StoreError(f"Redis at {self._where} failed {what}: {exc}") from None


def _or_empty(value: int | None) -> int | str:
    return "" if value is None else value
