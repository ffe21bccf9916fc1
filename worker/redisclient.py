"""The one Redis client factory: standalone, Redis Cluster or Sentinel, from one URL.

Every part of the project that talks to Redis (the worker, the SDK, ``status``,
``dlq``, ``trim``, ``demo``, health) gets its client from :func:`connect`:

* ``AUDIT_REDIS_MODE=standalone`` — ``redis://`` / ``rediss://`` / ``unix://``;
* ``cluster`` — the same URL naming any node; the client discovers the others and
  follows MOVED/ASK redirections;
* ``sentinel`` — ``redis+sentinel://[user:pass@]host1:26379,host2:26379/<master>/<db>``
  (``rediss+sentinel://`` for TLS); the client asks the Sentinels for the master and
  follows a failover;
* ``auto`` (the default) — Sentinel for a ``+sentinel`` URL, otherwise it asks the
  server (``INFO cluster``) whether cluster mode is on.

TLS (``rediss``) and an ACL user name and password in the URL work in every mode
(for Sentinel they are the master's; ``?sentinel_username=&sentinel_password=``
authenticate to the Sentinels themselves when they require it). The TLS options of a
``rediss://`` URL (``?ssl_ca_certs=/path/ca.crt``, ``ssl_certfile``, ``ssl_keyfile``,
``ssl_cert_reqs``, ``ssl_check_hostname``, ``ssl_ca_path``) are redis-py's own; in a
``rediss+sentinel://`` URL they apply to the Sentinels and the master alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel

from .errors import ConfigError, RedisUnavailable
from .redisio import check_slots, translated

MODES = ("auto", "standalone", "cluster", "sentinel")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
URL_SCHEMES = ("redis", "rediss", "unix", *SENTINEL_SCHEMES)
#: The TLS options a Sentinel URL may carry (redis-py's connection arguments).
TLS_OPTIONS = ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
               "ssl_check_hostname")


@dataclass(frozen=True, slots=True)
class SentinelURL:
    """A parsed ``redis+sentinel://`` URL."""

    hosts: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    #: ``ssl_*`` connection arguments (TLS_OPTIONS), for the Sentinels and the master.
    tls_options: tuple[tuple[str, str], ...] = ()


def parse_sentinel_url(url: str) -> SentinelURL:
    """``redis+sentinel://[user:pass@]h1:26379,h2:26379/<master>[/<db>]`` → its parts."""
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ConfigError(f"not a Sentinel URL (redis+sentinel://…): {url!r}")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, _, pw = userinfo.partition(":")
        username, password = unquote(user) or None, unquote(pw) or None
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        host, _, port = item.strip().rpartition(":") if ":" in item else (item, "", "26379")
        host = host.strip("[]")
        if not host:
            raise ConfigError(f"Sentinel URL has an empty host: {url!r}")
        try:
            hosts.append((host, int(port or 26379)))
        except ValueError:
            raise ConfigError(f"Sentinel URL has a bad port {port!r}: {url!r}") from None
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ConfigError(
            f"Sentinel URL must end in /<master-name> or /<master-name>/<db>: {url!r}"
        )
    try:
        db = int(path[1]) if len(path) == 2 else 0
    except ValueError:
        raise ConfigError(f"Sentinel URL database must be a number: {url!r}") from None
    query = parse_qs(parts.query)
    unknown = sorted(set(query) - {"sentinel_username", "sentinel_password", *TLS_OPTIONS})
    if unknown:
        raise ConfigError(f"Sentinel URL has unknown options {unknown}: {url!r}")
    tls_options = tuple((k, query[k][0]) for k in TLS_OPTIONS if k in query)
    if tls_options and parts.scheme != "rediss+sentinel":
        raise ConfigError(f"TLS options need a rediss+sentinel:// URL: {url!r}")
    return SentinelURL(
        hosts=tuple(hosts), master=unquote(path[0]), db=db, username=username,
        password=password, tls=parts.scheme == "rediss+sentinel",
        sentinel_username=query.get("sentinel_username", [None])[0],
        sentinel_password=query.get("sentinel_password", [None])[0],
        tls_options=tls_options,
    )


def mode_of(url: str, mode: str) -> str:
    """Check the URL against the mode; ``auto`` becomes ``sentinel`` for a Sentinel URL."""
    if mode not in MODES:
        raise ConfigError(f"AUDIT_REDIS_MODE must be one of {'|'.join(MODES)}, got {mode!r}")
    scheme = urlsplit(url).scheme
    if scheme not in URL_SCHEMES:
        raise ConfigError(
            "AUDIT_REDIS_URL must be redis://, rediss://, unix:// or redis+sentinel://, "
            f"got {url!r}"
        )
    sentinel = scheme in SENTINEL_SCHEMES
    if mode == "auto" and sentinel:
        return "sentinel"
    if (mode == "sentinel") != sentinel:
        raise ConfigError(
            "AUDIT_REDIS_MODE=sentinel needs a redis+sentinel:// URL and a redis+sentinel:// "
            f"URL needs AUDIT_REDIS_MODE=sentinel or auto (got mode {mode!r}, URL {url!r})"
        )
    if mode == "cluster" and scheme == "unix":
        raise ConfigError("AUDIT_REDIS_MODE=cluster needs a redis:// or rediss:// URL")
    return mode


def is_cluster(redis: aioredis.Redis) -> bool:
    """True for a Redis Cluster client."""
    return isinstance(redis, RedisCluster)  # type: ignore[unreachable, unused-ignore]


def client(url: str, mode: str, **kwargs: Any) -> aioredis.Redis:
    """A client for ``mode`` (not ``auto``), without any I/O yet.

    A cluster client is typed as :class:`redis.asyncio.Redis`: it answers the same
    commands; the few places that need to know use :func:`is_cluster`.
    """
    mode = mode_of(url, mode)
    if mode == "standalone":
        return aioredis.Redis.from_url(url, **kwargs)
    if mode == "cluster":
        return cast(aioredis.Redis, RedisCluster.from_url(url, **kwargs))
    if mode == "sentinel":
        return _sentinel_master(parse_sentinel_url(url), **kwargs)
    raise ConfigError("AUDIT_REDIS_MODE=auto needs connect(), which asks the server")


def _sentinel_master(target: SentinelURL, **kwargs: Any) -> aioredis.Redis:
    tls: dict[str, Any] = {}
    if target.tls:
        tls = {"ssl": True, **{k: v.lower() not in ("0", "false", "no")
                               if k == "ssl_check_hostname" else v
                               for k, v in target.tls_options}}
    sentinel_kwargs: dict[str, Any] = dict(tls)
    if target.sentinel_password:
        sentinel_kwargs["password"] = target.sentinel_password
        if target.sentinel_username:
            sentinel_kwargs["username"] = target.sentinel_username
    master_kwargs: dict[str, Any] = {"db": target.db, **kwargs}
    if target.username:
        master_kwargs["username"] = target.username
    if target.password:
        master_kwargs["password"] = target.password
    master_kwargs.update(tls)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        list(target.hosts), sentinel_kwargs=sentinel_kwargs, **master_kwargs)
    master: aioredis.Redis = sentinel.master_for(target.master)
    return master


async def connect(
    url: str, mode: str = "auto", *, streams: tuple[str, ...] = (), **kwargs: Any
) -> aioredis.Redis:
    """A client for ``url`` in ``mode``; ``auto`` asks the server whether it is a cluster.

    On a cluster, ``streams`` are checked first (:func:`worker.redisio.check_slots`):
    a configuration whose dead-letter keys land in another slot is refused.
    Connection errors leave as :class:`~worker.errors.RedisUnavailable`.
    """
    mode = mode_of(url, mode)
    if mode == "auto":
        probe = aioredis.Redis.from_url(url, **kwargs)
        try:
            with _unreachable():
                info = await probe.info("cluster")
        finally:
            await probe.aclose()
        mode = "cluster" if int(info.get("cluster_enabled", 0)) else "standalone"
    if mode == "cluster":
        check_slots(streams)
        cluster = RedisCluster.from_url(url, **kwargs)
        with _unreachable():
            await cluster.initialize()  # learn the nodes and slots now: errors surface here
        return cast(aioredis.Redis, cluster)
    return client(url, mode, **kwargs)


@contextmanager
def _unreachable() -> Iterator[None]:
    """Connection errors at start name Redis and the setting (never the URL: it may hold
    a password)."""
    try:
        with translated():
            yield
    except RedisUnavailable as exc:
        raise RedisUnavailable(exc.kind, f"cannot reach Redis (AUDIT_REDIS_URL): "
                                         f"{exc.detail}") from exc


async def connect_settings(settings: Any, **kwargs: Any) -> aioredis.Redis:
    """:func:`connect` with ``AUDIT_REDIS_URL``, ``AUDIT_REDIS_MODE`` and the streams."""
    return await connect(settings.redis_url, settings.redis_mode, streams=settings.streams,
                         **kwargs)
