"""The ``redis`` store (the seed's mnesia row): sessions in Redis, shared by many processes.

Three deployments, by URL (:mod:`~workers.stores.redis_urls`): one server
(``redis://HOST:PORT/DB``), a primary found and followed through Sentinel
(``redis+sentinel://HOST:PORT[,...]/SERVICE_NAME``), or a Redis Cluster
(``redis+cluster://HOST:PORT[,...]``, seed nodes). coredis follows a Sentinel failover and a
cluster's ``MOVED``/``ASK`` redirections and failovers by itself; the store adds the layout.

Layout
------
Sessions live in *buckets*: one on a server (Sentinel included), ``buckets`` (default 64) on a
cluster. Under a key prefix (``prefix``, default ``"sessions:"``), bucket ``b`` keeps:

``<head>s:<id>``
    the session's msgpack record (:func:`~workers.record.codec.encode_session`), a plain string,
    so a load is one ``MGET`` per bucket. Nothing is ever pickled.
``<head>ids``
    a sorted set of the bucket's ids, all scored 0, so that Redis orders it by id: a
    :meth:`~RedisStore.scan` page is one ``ZRANGE ... BYLEX`` from the last id returned plus
    one ``MGET``. ``SCAN`` would need no index, but it may return a key twice (when Redis
    shrinks its table between calls), which the Store protocol forbids.
``<head>expiry``
    a sorted set of the ids of the bucket's sessions that expire, scored by ``expires_at``:
    :meth:`~RedisStore.expired` is one ``ZRANGE ... BYSCORE`` a bucket and
    :meth:`~RedisStore.count` is ``ZCARD ids - ZCOUNT expiry -inf (now``, so neither reads a
    live session.
``<head>mark`` (bucket 0 only)
    the clock high-water mark in ms (:class:`~workers.stores.base.Mark`); raised, never
    lowered, inside the commit script. Not a session key: never listed or counted.

On a server ``<head>`` is the prefix itself (``sessions:s:<id>``, ``sessions:ids``...). On a
cluster it is ``<prefix>{<tag>}``, a hash tag per bucket, so that every key of a bucket is in
one hash slot and each script (which must touch one slot) covers a whole bucket. The tags are
chosen so that bucket ``b`` falls in the ``b``-th 1/``buckets`` of the 16384 slots: buckets
spread over the masters as evenly as the slots do, and sessions with them. A cluster store also
records ``<prefix>layout`` (its bucket count) before its first commit, and refuses to open data
laid out with another.

The bucket of a session is ``crc32(id) % buckets``: a pure function of the id, so any process
finds any session. The trade-off is in ``rotate``, which must keep a session in its bucket to
move it atomically (one script): it draws new random ids until one falls in the bucket, ``buckets``
draws on average (64 draws of 16 random bytes: microseconds), and the new id keeps 128 random
bits of which ``log2(buckets)`` are known to anyone who knows the old id (its bucket). Putting
the bucket *in* the id instead (a fixed hex digit) would cost the same bits, every id would
show it, and ids from an application's ``id_factory`` would have to be rewritten; drawing leaves
every id as the factory made it.

Writes
------
:meth:`~RedisStore.commit` runs one ``EVALSHA`` of
:data:`~workers.stores.redis_scripts.COMMIT_SCRIPT` per bucket the batch touches (one, on a
server). A script runs without interleaving any other client's commands, so within a bucket the
checks (a create needs a free id, a put the version it names, a delete the version or the
expiry it names, a rotate's put the old id at the version it moves) and the writes are atomic
with respect to every other store sharing the data: concurrent read-modify-write cycles from
several processes lose nothing, the loser of a race sees ``False`` and its manager retries. Once
a write to an id fails, the later writes of the batch to that id fail too (the Store protocol's
rule). The script checks everything before its first write, so an error leaves the bucket
untouched. A batch over several buckets (a cluster) commits each bucket on its own,
concurrently; when some buckets fail and others do not, the commit raises
:class:`~workers.stores.base.PartialCommit` with each write's outcome, and the manager answers
each operation from its own bucket's.

A ``retrieve`` costs one round trip: the manager loads the sessions it refreshes with
:meth:`~RedisStore.load_touching`, one script per bucket that checks expiry, writes the new
access time and returns the record. If that write is refused (a Redis at ``maxmemory`` with
``noeviction``), the bucket is read with a plain ``MGET`` instead, and the manager answers the
read anyway (see ``core/manager.py``): a full Redis keeps serving reads while writes fail with
:class:`~workers.StoreError`.

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
``command_timeout``, is loading its data set, or is failing over (a cluster without a master
for a slot, a Sentinel primary being replaced), a call raises
:class:`~workers.ServiceUnavailable` promptly and never hangs; once the new primary answers,
calls succeed again with no restart of anything. Other Redis errors (out of memory under
``maxmemory-policy noeviction``, a read-only replica named as the server, a broken record)
raise :class:`~workers.StoreError`, and so does a URL of the wrong form: a ``redis://`` URL
naming a cluster node, or a ``redis+cluster://`` URL naming a lone server, says which form to
use (a cluster's ``MOVED``, ``ASK`` and ``CROSSSLOT`` replies never reach a caller raw). A
commit is never retried by the store, since a commit whose reply was lost may have been
applied; reads are retried once on a dropped connection.

Durability and failover
-----------------------
Redis replicates asynchronously: a write acknowledged by a primary that fails before its
replica received it is lost in the failover. ``wait_replicas=N`` makes every commit wait (Redis
``WAIT``, at most ``wait_timeout`` seconds) until ``N`` replicas hold it; a commit that they do
not confirm in time raises :class:`~workers.ServiceUnavailable` (it was applied on the primary
and may or may not survive a failover). Access-time refreshes are not waited for: losing one
makes a session expire earlier by that read's idle time, never later.

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
survive a restart of Redis, and with replicas and Sentinel or Cluster for availability (see
"Durability and failover"). Several services (daemons or embedded) share sessions by using the
same URL and ``prefix``; different prefixes (or database numbers) keep unrelated services apart.
"""

from __future__ import annotations

import binascii
import contextlib
import functools
import logging
import zlib
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import coredis
import trio
from coredis.exceptions import (
    ClusterCrossSlotError,
    RedisClusterError,
    RedisError,
    ReplicationError,
    SentinelError,
)
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.retry import NoRetryPolicy

from ..record.codec import decode_session, encode_session
from ..record.errors import ServiceUnavailable, SessionError, StoreError, describe
from ..record.session import Session
from .base import (
    Delete,
    Mark,
    PartialCommit,
    PartialLoad,
    Put,
    Write,
    check_limit,
    check_writes,
    write_id,
)
from .redis_scripts import COMMIT_SCRIPT, COUNT_SCRIPT, TOUCH_SCRIPT
from .redis_sentinel import FailoverWatch, leaf
from .redis_urls import RedisTarget, clients_for, parse_url, redact_url
from .urls import DEFAULT_REDIS_URL

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Hash slots of a Redis Cluster.
SLOTS = 16384
#: Buckets of a cluster store unless told otherwise: enough to spread sessions evenly over a
#: few dozen masters, few enough that a count or a sweep (one call per bucket) stays cheap.
CLUSTER_BUCKETS = 64
#: Calls to different buckets in flight at once (count, sweep, a batch over many buckets).
PARALLEL_BUCKETS = 16
#: Redis error replies that only a cluster node sends.
_CLUSTER_REPLIES = ("MOVED", "ASK", "CROSSSLOT", "CLUSTERDOWN", "TRYAGAIN")


@dataclass(frozen=True, slots=True)
class Bucket:
    """The keys of one bucket (see the module docstring, "Layout")."""

    index: int
    ids: str
    expiry: str
    sessions: str


@dataclass(frozen=True, slots=True)
class _Client:
    """What the system task runs: ``managers`` entered in order (the last one is the client
    commands go to), and ``follow`` alongside while they are open."""

    managers: tuple[Any, ...]
    follow: Callable[[], Awaitable[None]] | None = None


@functools.cache
def bucket_tags(n: int) -> tuple[str, ...]:
    """The hash tag of each of ``n`` buckets: tag ``b`` hashes to a slot in the ``b``-th
    1/``n`` of the slots, so that buckets spread over masters as evenly as slots do."""
    tags: list[str | None] = [None] * n
    missing, k = n, 0
    while missing:
        tag = f"{k:x}"
        # crc_hqx is Redis's CRC16 (XMODEM): the key slot is crc16(tag) mod 16384.
        b = (binascii.crc_hqx(tag.encode(), 0) % SLOTS) * n // SLOTS
        if tags[b] is None:
            tags[b] = tag
            missing -= 1
        k += 1
    return tuple(tag for tag in tags if tag is not None)


class RedisStore:
    """Sessions in the Redis at ``url`` (a server, a Sentinel primary or a Redis Cluster), under
    the key prefix ``prefix``.

    Several store objects, in any number of processes, may use the same data at once: that is
    how several services share sessions. They must agree on ``url``'s form, ``prefix`` and, on
    a cluster, ``buckets``.

    :param url: see :mod:`~workers.stores.redis_urls`.
    :param prefix: the start of every key this store uses (no ``{`` or ``}`` on a cluster: the
        store chooses the hash tags).
    :param connect_timeout: seconds to establish a connection before giving up.
    :param command_timeout: seconds to wait for Redis to answer one command.
    :param expiry_grace: seconds that Redis keeps an expired session past its idle timeout
        before deleting it by itself (see the module docstring).
    :param buckets: buckets of a cluster store (default 64; every service on the same data
        must use the same number). Also ``?buckets=`` in the URL.
    :param wait_replicas: replicas every commit waits for (Redis ``WAIT``); 0 waits for none.
        Also ``?wait_replicas=`` in the URL.
    :param wait_timeout: seconds a commit waits for them before it fails with
        ``ServiceUnavailable``. Also ``?wait_timeout=`` in the URL.
    :param create: with False, ``open`` refuses (:class:`StoreError` naming the URL and the
        prefix) a prefix under which no service ever kept sessions: no id index and no clock
        mark. For tools that must not take a typo for an empty store.
    """

    backend = "redis"
    shared = True

    def __init__(
        self,
        url: str = DEFAULT_REDIS_URL,
        *,
        prefix: str = "sessions:",
        connect_timeout: float = 2.0,
        command_timeout: float = 5.0,
        expiry_grace: float = 60.0,
        buckets: int | None = None,
        wait_replicas: int | None = None,
        wait_timeout: float | None = None,
        create: bool = True,
    ) -> None:
        if not prefix:
            raise ValueError("prefix must not be empty: the store would claim every key")
        if connect_timeout <= 0 or command_timeout <= 0 or expiry_grace < 0:
            raise ValueError("timeouts must be positive and expiry_grace not negative")
        self.url = url
        self._where = redact_url(url)
        try:
            self.target = parse_url(url)
            settings = _settings(self.target, prefix, buckets, wait_replicas, wait_timeout)
        except ValueError as exc:
            raise StoreError(f"cannot use Redis URL {self._where}: {exc}") from None
        cluster = self.target.kind == "cluster"
        self.buckets: int = settings["buckets"]
        self.wait_replicas: int = settings["wait_replicas"]
        self.wait_timeout: float = settings["wait_timeout"]
        self.prefix = prefix
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.expiry_grace = expiry_grace
        self.create = create
        self._grace_ms = round(expiry_grace * 1000)
        heads = [f"{prefix}{{{tag}}}" for tag in bucket_tags(self.buckets)] if cluster else [prefix]
        self._buckets = [
            Bucket(b, f"{head}ids", f"{head}expiry", f"{head}s:") for b, head in enumerate(heads)
        ]
        #: The clock mark, in bucket 0 (its slot, on a cluster), where Mark writes are committed.
        self._mark_key = f"{heads[0]}mark"
        #: Where a cluster store records its bucket count (see "Layout"), and whether it has.
        self._layout_key = f"{prefix}layout"
        self._layout_recorded = not cluster
        # Whatever coredis does inside, one call never takes longer than this.
        self._deadline = connect_timeout + command_timeout + 1.0
        if self.wait_replicas:
            self._deadline += self.wait_timeout
        self._client: Any = None
        self._start_error: BaseException | None = None
        self._scripts: dict[str, Any] = {}
        self._limiter = trio.CapacityLimiter(PARALLEL_BUCKETS)
        #: What a sentinel store hears of failovers (see redis_sentinel).
        self._watch: FailoverWatch | None = None
        self._closing: trio.Event | None = None
        self._closed: trio.Event | None = None

    def __repr__(self) -> str:
        return f"RedisStore({self._where!r}, prefix={self.prefix!r})"

    def bucket_of(self, session_id: str) -> int:
        """The bucket of ``session_id``: ``crc32(id) % buckets`` (see "Layout")."""
        if self.buckets == 1:
            return 0
        return zlib.crc32(session_id.encode("utf-8", "surrogatepass")) % self.buckets

    # -- the Store protocol ------------------------------------------------------------------

    async def open(self) -> None:
        """Start the client and check the URL's form against what answers; :class:`StoreError`
        naming the URL (and the form to use) if it fails."""
        if self._closing is not None:
            raise StoreError(f"{self!r} is already open")
        try:
            client = self._client_factory()
        except (ValueError, TypeError, RedisError) as exc:
            raise StoreError(f"cannot use Redis URL {self._where}: {exc}") from None
        self._closing, self._closed = trio.Event(), trio.Event()
        ready = trio.Event()
        self._start_error = None
        trio.lowlevel.spawn_system_task(
            self._own_client,
            client,
            ready,
            self._closing,
            self._closed,
            name=f"redis store client {self._where}",
        )
        try:
            with trio.move_on_after(self._deadline) as waited:
                await ready.wait()
            if waited.cancelled_caught:
                raise StoreError(f"cannot open the redis store: no answer from {self._where}")
            if self._client is None:
                raise await self._start_failure()
            try:
                await self._check_form()
                if not self.create:
                    await self._check_exists()
            except ServiceUnavailable as exc:
                raise StoreError(f"cannot open the redis store: {exc}") from None
            client = self._client
            self._scripts = {
                "commit": client.register_script(COMMIT_SCRIPT),
                "touch": client.register_script(TOUCH_SCRIPT),
                "count": client.register_script(COUNT_SCRIPT),
            }
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
        """The stored sessions among ``ids`` (expired ones included): one ``MGET`` a bucket."""
        return await self.load_touching(ids, (), 0)

    async def load_touching(
        self, ids: Iterable[str], touch: Collection[str], now_ms: int
    ) -> dict[str, Session]:
        """:meth:`load`, refreshing the sessions in ``touch`` as it reads them, one script a
        bucket (:class:`~workers.stores.base.TouchingStore`, and "Writes" above)."""
        if touch and self._watch is not None:
            self._watch.check_writable(self._where)
        by_bucket = self._group(list(dict.fromkeys(ids)))
        calls = [
            functools.partial(self._load_bucket, bucket, bucket_ids, touch, now_ms)
            for bucket, bucket_ids in by_bucket.items()
        ]
        found: dict[str, Session] = {}
        errors: dict[str, SessionError] = {}
        failures: list[SessionError] = []
        for bucket_ids, result in zip(by_bucket.values(), await self._each(calls), strict=True):
            if isinstance(result, SessionError):
                failures.append(result)
                errors.update(dict.fromkeys(bucket_ids, result))
            else:
                found.update(result)
        if failures:
            if len(failures) == len(by_bucket):
                raise failures[0]
            raise PartialLoad(f"some buckets could not be read: {failures[0]}", found, errors)
        return found

    async def commit(self, writes: Sequence[Write]) -> list[bool]:
        """Apply ``writes`` in order, each bucket's atomically with one script call; per write,
        whether it took effect. Never retried: on :class:`ServiceUnavailable` a bucket's writes
        may or may not have been applied. :class:`PartialCommit` when some buckets failed and
        others did not."""
        check_writes(writes)
        if not writes:
            return []
        if self._watch is not None:
            self._watch.check_writable(self._where)
        groups: dict[Bucket, list[int]] = {}
        for i, write in enumerate(writes):
            b = 0 if isinstance(write, Mark) else self.bucket_of(write_id(write))
            if isinstance(write, Put) and write.moved_from is not None:
                if self.bucket_of(write.moved_from) != b:
                    raise ValueError(
                        f"a rotate moves a session within its bucket, not from bucket "
                        f"{self.bucket_of(write.moved_from)} to {b} (BucketedStore)"
                    )
            groups.setdefault(self._buckets[b], []).append(i)
        if not self._layout_recorded:
            await self._check_layout(record=True)
        calls = [
            functools.partial(self._commit_bucket, bucket, [writes[i] for i in indexes])
            for bucket, indexes in groups.items()
        ]
        outcomes: list[bool | SessionError] = [False] * len(writes)
        failures: list[SessionError] = []
        for indexes, result in zip(groups.values(), await self._each(calls), strict=True):
            if isinstance(result, SessionError):
                failures.append(result)
                for i in indexes:
                    outcomes[i] = result
            else:
                for i, ok in zip(indexes, result, strict=True):
                    outcomes[i] = ok
        if failures:
            if len(failures) == len(groups):
                raise failures[0]
            raise PartialCommit(f"some buckets failed the commit: {failures[0]}", outcomes)
        return [ok is True for ok in outcomes]

    async def scan(
        self, now_ms: int, cursor: str | None, limit: int
    ) -> tuple[list[Session], str | None]:
        """Up to ``limit`` live sessions after ``cursor``: bucket by bucket, each in id order.
        The cursor is ``"<bucket>:<last id>"``."""
        check_limit(limit)
        index, after = self._parse_cursor(cursor)
        page: list[Session] = []
        for bucket in self._buckets[index:]:
            while True:
                start = "-" if after is None else "(" + after
                members = await self._call(
                    "ZRANGE",
                    lambda c, key=bucket.ids, start=start: c.zrange(
                        key, start, "+", sortby=coredis.PureToken.BYLEX, offset=0, count=limit
                    ),
                    retry=True,
                )
                ids = [member.decode() for member in members]
                found = await self._mget(bucket, ids)
                for sid in ids:
                    session = found.get(sid)
                    if session is not None and not session.expired_at(now_ms):
                        page.append(session)
                        if len(page) == limit:
                            return page, f"{bucket.index}:{sid}"
                if len(ids) < limit:
                    break
                after = ids[-1]
            after = None  # every later bucket is read from its start
        return page, None

    async def expired(self, now_ms: int, limit: int) -> list[str]:
        """Up to ``limit`` ids of sessions expired at ``now_ms``, soonest expired first."""
        check_limit(limit)
        calls = [
            functools.partial(self._expired_in, bucket, now_ms, limit) for bucket in self._buckets
        ]
        found = [pair for pairs in _all(await self._each(calls)) for pair in pairs]
        found.sort()
        return [sid for _, sid in found[:limit]]

    async def load_mark(self) -> int:
        """The clock high-water mark (the highest Mark any store committed here), 0 if none."""
        key = self._mark_key
        value = await self._call("GET", lambda c: c.get(key), retry=True)
        return 0 if value is None else int(value)

    async def count(self, now_ms: int) -> int:
        """The number of live sessions at ``now_ms``, from the indexes of every bucket."""
        script = self._scripts["count"]
        calls = [
            functools.partial(
                self._call,
                "count",
                lambda c, b=bucket: script(keys=[b.ids, b.expiry], args=[now_ms], client=c),
                retry=True,
            )
            for bucket in self._buckets
        ]
        return sum(int(n) for n in _all(await self._each(calls)))

    # -- buckets -----------------------------------------------------------------------------

    def _group(self, ids: list[str]) -> dict[Bucket, list[str]]:
        groups: dict[Bucket, list[str]] = {}
        for sid in ids:
            groups.setdefault(self._buckets[self.bucket_of(sid)], []).append(sid)
        return groups

    async def _each(self, calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T | SessionError]:
        """Run ``calls`` (one per bucket) concurrently; each one's result or SessionError."""
        if len(calls) == 1:  # the common case on a server: no nursery
            try:
                return [await calls[0]()]
            except SessionError as exc:
                return [exc]
        results: list[T | SessionError] = [StoreError("not run")] * len(calls)

        async def run(i: int) -> None:
            async with self._limiter:
                try:
                    results[i] = await calls[i]()
                except SessionError as exc:
                    results[i] = exc

        async with trio.open_nursery() as nursery:
            for i in range(len(calls)):
                nursery.start_soon(run, i)
        return results

    async def _mget(self, bucket: Bucket, ids: list[str]) -> dict[str, Session]:
        if not ids:
            return {}
        keys = [bucket.sessions + sid for sid in ids]
        records = await self._call("MGET", lambda c: c.mget(keys), retry=True)
        return _decoded(ids, records)

    async def _load_bucket(
        self, bucket: Bucket, ids: list[str], touch: Collection[str], now_ms: int
    ) -> dict[str, Session]:
        flags = ["1" if sid in touch else "0" for sid in ids]
        if "1" not in flags:
            return await self._mget(bucket, ids)
        keys = [bucket.expiry, *(bucket.sessions + sid for sid in ids)]
        args: list[str | int] = [now_ms, self._grace_ms]
        for sid, flag in zip(ids, flags, strict=True):
            args += [sid, flag]
        script = self._scripts["touch"]
        try:
            records = await self._call(
                "touch", lambda c: script(keys=keys, args=args, client=c), retry=False
            )
        except StoreError:
            # The refresh was refused (a full Redis): read them as they are; the manager
            # answers the reads and counts the refreshes it could not write.
            return await self._mget(bucket, ids)
        return _decoded(ids, records)

    async def _commit_bucket(self, bucket: Bucket, writes: list[Write]) -> list[bool]:
        keys: list[str] = [bucket.ids, bucket.expiry]
        sources: list[str] = []
        args: list[str | bytes | int] = []
        for write in writes:
            if isinstance(write, Put):
                session = write.session
                keys.append(bucket.sessions + session.id)
                source: int | str = ""
                if write.moved_from is not None:
                    sources.append(bucket.sessions + write.moved_from)
                    source = len(writes) + 2 + len(sources)  # its index in KEYS (from 1)
                args += [
                    "P",
                    session.id,
                    _or_empty(write.expected_version),
                    encode_session(session),
                    _or_empty(session.expires_at),
                    "" if session.timeout_ms is None else session.timeout_ms + self._grace_ms,
                    session.version,
                    source,
                ]
            elif isinstance(write, Mark):
                keys.append(self._mark_key)
                args += ["M", "", "", "", "", "", write.ms, ""]
            else:
                assert isinstance(write, Delete)
                keys.append(bucket.sessions + write.id)
                args += [
                    "D",
                    write.id,
                    _or_empty(write.if_expired_at),
                    "",
                    "",
                    "",
                    _or_empty(write.expected_version),
                    "",
                ]
        keys += sources
        script = self._scripts["commit"]

        async def run(client: Any) -> list[int]:
            if not self.wait_replicas:
                return await script(keys=keys, args=args, client=client)
            with client.ensure_replication(self.wait_replicas, round(self.wait_timeout * 1000)):
                return await script(keys=keys, args=args, client=client)

        results = await self._call("commit", run, retry=False)
        return [bool(ok) for ok in results]

    async def _expired_in(self, bucket: Bucket, now_ms: int, limit: int) -> list[tuple[int, str]]:
        members = await self._call(
            "ZRANGE",
            lambda c: c.zrange(
                bucket.expiry,
                "-inf",
                f"({now_ms}",
                sortby=coredis.PureToken.BYSCORE,
                offset=0,
                count=limit,
                withscores=True,
            ),
            retry=True,
        )
        return [(int(score), member.decode()) for member, score in members]

    def _parse_cursor(self, cursor: str | None) -> tuple[int, str | None]:
        """The bucket to resume in and the id to resume after (None: the bucket's start)."""
        if cursor is None:
            return 0, None
        index, sep, after = cursor.partition(":")
        if sep and index.isdigit() and int(index) < self.buckets and after:
            return int(index), after
        raise StoreError(f"not a redis store scan cursor: {describe(cursor)}")

    # -- the client ----------------------------------------------------------------------------

    def _client_factory(self) -> _Client:
        """The client this URL needs, for the system task to enter (see "coredis and Trio")."""
        # Retrying a command whose reply was lost could apply a commit twice; the store
        # decides itself what is safe to retry.
        managers = clients_for(
            self.target,
            connect_timeout=self.connect_timeout,
            command_timeout=self.command_timeout,
            retry_policy=NoRetryPolicy(),
        )
        if self.target.kind != "sentinel":
            return _Client(managers)
        sentinel, primary = managers
        watch = FailoverWatch(self.target.service, primary.connection_pool.disconnect)
        self._watch = watch
        return _Client(managers, functools.partial(watch.run, sentinel.sentinels))

    async def _own_client(
        self, client: _Client, ready: trio.Event, closing: trio.Event, closed: trio.Event
    ) -> None:
        try:
            async with contextlib.AsyncExitStack() as stack:
                for manager in client.managers:
                    await stack.enter_async_context(manager)
                async with trio.open_nursery() as nursery:
                    if client.follow is not None:
                        nursery.start_soon(client.follow)
                    self._client = client.managers[-1]
                    ready.set()
                    await closing.wait()
                    nursery.cancel_scope.cancel()
        except Exception as exc:
            # An exception out of a system task would crash the whole Trio run: keep it for
            # open, or report it here; the store's calls fail with StoreError from now on.
            if ready.is_set():
                log.error("the Redis client of %r stopped: %s", self, leaf(exc))
            else:
                self._start_error = leaf(exc)
        finally:
            self._client = None
            ready.set()
            closed.set()

    async def _start_failure(self) -> StoreError:
        """The StoreError for a client that could not start (a cluster that cannot be found)."""
        error = self._start_error
        if self.target.kind == "cluster":
            for host, port in self.target.nodes:
                if await _cluster_enabled(host, port, self.connect_timeout) is False:
                    return StoreError(
                        f"Redis at {host}:{port} is a single server, not a cluster node "
                        f"({self._where}): use redis://{host}:{port}/0 (or redis+sentinel://)"
                    )
        return StoreError(f"cannot open the redis store at {self._where}: {error}")

    async def _check_exists(self) -> None:
        """StoreError unless sessions were ever kept under the prefix: its clock mark, or an
        id index (a store filled by ``migrate`` has no mark). One key at a time: on a
        cluster they live in different slots."""
        for key in (self._mark_key, *(bucket.ids for bucket in self._buckets)):
            if await self._call("EXISTS", lambda c, key=key: c.exists([key]), retry=True):
                return
        raise StoreError(
            f"no redis store at {self._where} under prefix {self.prefix!r}: no session was "
            "ever kept there (check --url and --prefix)"
        )

    async def _check_form(self) -> None:
        """Refuse a URL whose form does not match what answers (see "Failures")."""
        if self.target.kind == "cluster":
            await self._check_layout()
            return
        try:
            enabled = await self._call("INFO", lambda c: c.info("cluster"), retry=True)
        except StoreError as exc:
            if "cluster mode" in str(exc):  # SELECT is not allowed in cluster mode
                raise self._wrong_form() from None
            raise
        if enabled.get("cluster_enabled") == 1:
            raise self._wrong_form()

    def _wrong_form(self) -> StoreError:
        parts = urlsplit(self.target.url)
        hosts = f"{parts.hostname}:{parts.port or 6379}" if parts.hostname else "HOST:PORT"
        return StoreError(
            f"Redis at {self._where} is a Redis Cluster node: use "
            f"redis+cluster://{hosts}[,HOST:PORT...] (seed nodes), not a single-server URL"
        )

    async def _check_layout(self, *, record: bool = False) -> None:
        """Check this cluster store's bucket count against the one its data was written with;
        with ``record``, record it first if there is none (before the first commit: opening
        writes nothing, so a store only read never leaves a key behind)."""
        key, layout = self._layout_key, f"buckets={self.buckets}"
        if record:
            await self._call(
                "SET", lambda c: c.set(key, layout, condition=coredis.PureToken.NX), retry=True
            )
        stored = await self._call("GET", lambda c: c.get(key), retry=True)
        if stored is not None and stored.decode() != layout:
            raise StoreError(
                f"the sessions under {self.prefix!r} at {self._where} are laid out with "
                f"{stored.decode()}, not {layout}: every service on them needs the same buckets"
            )
        self._layout_recorded = stored is not None

    async def _call(self, what: str, command: Callable[[Any], Awaitable[T]], *, retry: bool) -> T:
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

    async def _send(self, what: str, command: Callable[[Any], Awaitable[T]]) -> T:
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
            raise self._error(what, exc) from None

    def _error(self, what: str, exc: RedisError) -> SessionError:
        """The service's error for a Redis error reply (see "Failures")."""
        text = str(exc)
        kind = self.target.kind
        if isinstance(exc, ReplicationError):
            return ServiceUnavailable(
                f"Redis at {self._where} applied {what} but fewer than {self.wait_replicas} "
                f"replicas confirmed it within {self.wait_timeout:g} s: a failover may lose it"
            )
        if isinstance(exc, RedisClusterError) or text.startswith(_CLUSTER_REPLIES):
            if kind != "cluster":
                return self._wrong_form()
            if isinstance(exc, ClusterCrossSlotError):  # a bug: the store keeps to one slot
                return StoreError(f"Redis Cluster at {self._where} refused {what}: {text}")
            # A slot without a master, redirections that did not settle: a failover.
            return ServiceUnavailable(f"Redis Cluster at {self._where} is failing over: {text}")
        if isinstance(exc, SentinelError):
            return ServiceUnavailable(f"no primary for Redis at {self._where} now: {text}")
        if text.startswith("READONLY"):
            if kind == "sentinel":  # the primary was just demoted: a failover is under way
                return ServiceUnavailable(f"Redis at {self._where} is failing over: {text}")
            return StoreError(
                f"Redis at {self._where} is a read-only replica: point the URL at the primary, "
                f"or use redis+sentinel:// to follow it ({text})"
            )
        if text.startswith("OOM"):
            return StoreError(
                f"Redis at {self._where} is full (maxmemory reached; with maxmemory-policy "
                f"noeviction nothing stored was lost): {what} refused"
            )
        if "unknown command" in text.lower() and "sentinel" in text.lower():
            return StoreError(f"{self._where} names a Redis that is not a Sentinel: {text}")
        return StoreError(f"Redis at {self._where} failed {what}: {text}")


async def _cluster_enabled(host: str, port: int, timeout: float) -> bool | None:
    """Whether the Redis at host:port runs in cluster mode; None if it does not answer."""
    try:
        with trio.fail_after(timeout + 1):
            async with coredis.Redis(
                host, port, connect_timeout=timeout, stream_timeout=timeout
            ) as client:
                return (await client.info("cluster")).get("cluster_enabled") == 1
    except Exception:  # anything at all: this only picks the message of another error
        return None


def _settings(
    target: RedisTarget,
    prefix: str,
    buckets: int | None,
    wait_replicas: int | None,
    wait_timeout: float | None,
) -> dict[str, Any]:
    """The store's settings from its arguments and the URL's query; ValueError if wrong."""
    cluster = target.kind == "cluster"
    settings = {
        "buckets": CLUSTER_BUCKETS if cluster else 1,
        "wait_replicas": 0,
        "wait_timeout": 1.0,
        **target.settings,
    }
    given = {"buckets": buckets, "wait_replicas": wait_replicas, "wait_timeout": wait_timeout}
    for name, value in given.items():
        if value is not None:
            if name in target.settings and target.settings[name] != value:
                raise ValueError(
                    f"{name} is {value!r} here and {target.settings[name]!r} in the URL"
                )
            settings[name] = value
    if not 1 <= settings["buckets"] <= SLOTS:
        raise ValueError(f"buckets is between 1 and {SLOTS}, got {settings['buckets']}")
    if cluster and ("{" in prefix or "}" in prefix):
        raise ValueError(
            f"a cluster store's prefix must not hold a hash tag ({prefix!r}): the store "
            "spreads its buckets over the cluster with tags of its own"
        )
    if settings["wait_replicas"] < 0 or settings["wait_timeout"] <= 0:
        raise ValueError("wait_replicas must not be negative, wait_timeout must be positive")
    return settings


def _all(results: Sequence[T | SessionError]) -> list[T]:
    """``results``, or the first error among them raised: for calls that need every bucket."""
    for result in results:
        if isinstance(result, SessionError):
            raise result
    return list(results)  # type: ignore[arg-type]


def _decoded(ids: list[str], records: Sequence[bytes | None]) -> dict[str, Session]:
    return {
        sid: decode_session(record)
        for sid, record in zip(ids, records, strict=True)
        if record is not None
    }


def _or_empty(value: int | None) -> int | str:
    return "" if value is None else value


__all__ = ["CLUSTER_BUCKETS", "RedisStore", "bucket_tags", "redact_url"]
