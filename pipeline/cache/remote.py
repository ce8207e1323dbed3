"""Reaching a store on object storage: how requests are retried, and a quick first check that the
endpoint answers at all.

Retries are the storage client's own, configured here rather than wrapped again: for S3 (s3fs on
botocore) every request is retried by botocore's "standard" mode, up to ``MAX_ATTEMPTS`` attempts
with jittered exponential backoff (at most 1, 2, 4, 8, 16 s between them) on connection errors,
timeouts, throttling and 5xx answers, and s3fs retries each call up to 5 times more on timeouts and
truncated or unparseable answers. Each object of a store is written by one request (a PUT replaces
an object whole, or not at all), so a retried write never leaves part of a shard. ``AWS_RETRY_MODE``
/ ``AWS_MAX_ATTEMPTS`` in the environment, or ``--storage-option
config_kwargs.retries.max_attempts=N``, take precedence.

Patient retries would make a wrong or unreachable endpoint look like a hang, so a command first
``check_reachable``: one request with a short connect timeout and no retries, which fails in a
second or so with one line naming the store.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from pipeline.errors import SkdError

MAX_ATTEMPTS = 6  # one try and five retries: rides out about half a minute of outage at worst
PROBE_CONNECT_SECONDS = 3.0


def _s3(url: str) -> bool:
    return str(url).split("://", 1)[0] in ("s3", "s3a")


def _merge_defaults(options: dict, defaults: dict) -> dict:
    """``options`` with ``defaults`` filled in where a key (at any depth) is not set."""
    merged = copy.deepcopy(options)
    for key, value in defaults.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge_defaults(merged[key], value)
        else:
            merged.setdefault(key, value)
    return merged


def network_options(url: str, storage_options: dict | None) -> dict[str, Any]:
    """The fsspec storage options a store at ``url`` is opened with: the user's, the environment's
    S3 endpoint made explicit, and the retry policy above for S3 where neither the options nor the
    environment set one."""
    options = dict(storage_options or {})
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if _s3(url) and endpoint and "endpoint_url" not in options and "endpoint_url" not in options.get("client_kwargs", {}):
        # Explicit, so that fsspec's cached file system for these options is this endpoint's and not
        # one made earlier in the process while the environment named another.
        options["endpoint_url"] = endpoint
    if not _s3(url) or "AWS_RETRY_MODE" in os.environ or "AWS_MAX_ATTEMPTS" in os.environ:
        return options
    return _merge_defaults(options, {"config_kwargs": {"retries": {"mode": "standard", "max_attempts": MAX_ATTEMPTS}}})


def network_errors() -> tuple[type[BaseException], ...]:
    """The exception types a failed request to object storage raises once its retries are spent:
    OSError (what s3fs makes of the server's error answers), botocore's connection and credential
    errors, aiohttp's, and timeouts."""
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    try:
        from botocore.exceptions import BotoCoreError

        errors.append(BotoCoreError)
    except ImportError:
        pass
    try:
        from aiohttp import ClientError

        errors.append(ClientError)
    except ImportError:
        pass
    return tuple(errors)


def describe(exc: BaseException) -> str:
    """An error from a request, in one line without credentials."""
    from pipeline.cache.store import scrub

    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {scrub(text)}".replace("\n", " ")


def check_reachable(url: str, storage_options: dict | None, what: str) -> None:
    """Raise one line naming ``url`` (redacted) when its endpoint does not answer: one request, no
    retries, a short connect timeout. A missing store or bucket is not an error here (the caller
    decides); an unreachable endpoint, refused credentials or a malformed URL are."""
    import fsspec

    from pipeline.cache.store import redact

    options = dict(storage_options or {})
    if _s3(url):
        # A client of its own: the probe must neither retry nor share the (patient) cached one.
        config = {**options.get("config_kwargs", {}), "retries": {"mode": "standard", "max_attempts": 1},
                  "connect_timeout": PROBE_CONNECT_SECONDS}
        options = {**options, "skip_instance_cache": True, "config_kwargs": config}
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
        if _s3(url):
            fs.retries = 1  # s3fs's own retry loop, around botocore's
            bucket, key, _ = fs.split_path(path)
            # One listing request: answers for a missing key too, and fails on a missing bucket,
            # a refused connection or refused credentials.
            fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1)
        else:
            fs.exists(path)
    except FileNotFoundError:
        return  # no such bucket: the caller's own request says so, naming what it wanted
    except Exception as exc:  # noqa: BLE001 -- any failure here means the store cannot be reached
        raise SkdError(f"cannot reach {redact(url)} ({describe(exc)}): check the endpoint, network and "
                       f"credentials; {what}") from None
