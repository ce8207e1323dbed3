"""Icechunk against skd's plain-Zarr protocol on object storage, on the same store: write and read
speed, what an interrupted write leaves, and cooperative writers (docs/CACHE.md, "Why plain Zarr,
not Icechunk").

Both sides write the same arrays (shapes, chunks, shards, filters, compressors and values of an
existing store, e.g. the demo's) through zarr-python to a moto S3 server on 127.0.0.1 that this
script starts in its own process; only the storage differs:

- plain: skd's protocol (``pipeline.cache.writer``): each shard's arrays written whole, then its
  ``done`` flags, by 4 write threads; ``complete: true`` last.
- icechunk: the same writes into one Icechunk session, one commit at the end; and a variant that
  commits after every shard (which is what resuming after a crash at shard granularity needs).

Icechunk is not a dependency of skd: run this with a Python that has it (1.x on Python 3.11, e.g. a
scratch venv that also sees skd's packages through a .pth file):

    python bench/icechunk_eval.py --store runs/demo/synthetic.zarr --output icechunk.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import zarr

KEYS = {"key": "testing", "secret": "testing"}


REQUEST_LOG = "/tmp/icechunk_eval_requests.log"


def requests() -> int:
    """Requests the S3 server has answered so far (one werkzeug log line each)."""
    with open(REQUEST_LOG) as f:
        return sum(1 for line in f if '" ' in line and "HTTP/1.1" in line)


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = ("import logging, time; from moto.server import ThreadedMotoServer; "
            "logging.basicConfig(level=logging.INFO, format='%(message)s'); "
            f"ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False).start(); time.sleep(1e9)")
    log = open(REQUEST_LOG, "w")
    server = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server, url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the S3 server did not start")


def s3fs_options(endpoint: str) -> dict:
    return {"endpoint_url": endpoint, **KEYS, "client_kwargs": {"region_name": "us-east-1"}}


def icechunk_repo(endpoint: str, prefix: str, create: bool = True):
    import icechunk

    storage = icechunk.s3_storage(bucket="bench", prefix=prefix, endpoint_url=endpoint, allow_http=True,
                                  access_key_id=KEYS["key"], secret_access_key=KEYS["secret"], region="us-east-1",
                                  force_path_style=True)
    return icechunk.Repository.create(storage) if create else icechunk.Repository.open(storage)


def read_source(path: str, images: int | None) -> tuple[dict, dict, dict]:
    """The store's group attributes, each array's metadata and its values (decoded), cut to its
    first ``images`` images."""
    group = zarr.open_group(path, mode="r")
    total = group["done"].shape[0]
    n = total if images is None else min(images, total)
    meta, values = {}, {}
    for name, array in group.arrays():
        over_images = array.shape[:1] == group["done"].shape
        meta[name] = {"shape": ((n, *array.shape[1:]) if over_images else array.shape), "dtype": array.dtype,
                      "chunks": array.chunks, "shards": array.shards, "filters": array.filters,
                      "compressors": array.compressors, "fill_value": array.fill_value, "attributes": dict(array.attrs)}
        values[name] = array[:n] if over_images else array[:]
    return dict(group.attrs), meta, values


def say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def lay_out(group: zarr.Group, attrs: dict, meta: dict, values: dict) -> list[str]:
    """The empty store (arrays not over images written whole, as skd's create_store does); the
    names of the arrays written shard by shard."""
    group.attrs.update({**attrs, "complete": False})
    n = len(values["done"])
    per_image = []
    for name, m in meta.items():
        array = group.create_array(name, **m)
        if m["shape"][:1] == (n,) and name != "image_hw":
            per_image.append(name)
        else:
            array[...] = values[name]
    return [name for name in per_image if name != "done"]


def write_shards(group: zarr.Group, names: list[str], values: dict, shards: list[tuple[int, int]], threads: int,
                 after_each=None) -> None:
    arrays = {name: group[name] for name in [*names, "done"]}  # opened once, as skd's writer does

    def one(bounds: tuple[int, int]) -> None:
        a, b = bounds
        for name in names:
            arrays[name][a:b] = values[name][a:b]
        arrays["done"][a:b] = True  # only after the maps
        if after_each is not None:
            after_each(bounds)

    if threads <= 1:
        for bounds in shards:
            one(bounds)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, shards))


def read_all(group: zarr.Group, names: list[str], n: int, shard: int, threads: int = 8) -> float:
    """Every shard of every array read (as cache-verify does: one read per shard file, 8 threads); seconds."""
    start = time.perf_counter()
    arrays = {name: group[name] for name in names}  # opened once, as skd's TeacherStore does

    def one(a: int) -> int:
        return sum(arrays[name][a:min(a + shard, n)].size for name in names)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(0, n, shard)))
    return time.perf_counter() - start


def bucket_objects(endpoint: str, prefix: str) -> tuple[int, int]:
    import s3fs

    fs = s3fs.S3FileSystem(**s3fs_options(endpoint), skip_instance_cache=True)
    found = fs.find(f"bench/{prefix}", detail=True)
    return len(found), sum(info["size"] for info in found.values())


def _fork_worker(args) -> object:
    """One cooperative Icechunk writer (its own process): its shards into a forked session."""
    fork, names, values, shards = args
    group = zarr.open_group(fork.store, mode="r+")
    write_shards(group, names, values, shards, threads=4)
    return fork


def _plain_worker(args) -> None:
    """One cooperative plain writer (its own process): its shards into the shared store."""
    url, options, names, values, shards = args
    group = zarr.open_group(url, mode="r+", storage_options=options)
    write_shards(group, names, values, shards, threads=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="runs/demo/synthetic.zarr")
    parser.add_argument("--images", type=int, default=None, help="Only the store's first N images.")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    import icechunk
    import s3fs

    attrs, meta, values = read_source(args.store, args.images)
    n, shard = len(values["done"]), int(attrs["shard_images"])
    shards = [(a, min(a + shard, n)) for a in range(0, n, shard)]
    server, endpoint = start_server()
    options = s3fs_options(endpoint)
    results: dict = {"store": args.store, "images": n, "shards": len(shards), "icechunk": icechunk.__version__,
                     "zarr": zarr.__version__}
    try:
        s3fs.S3FileSystem(**options, skip_instance_cache=True).call_s3("create_bucket", Bucket="bench")

        # 1. Writing the whole store.
        counted = requests()
        start = time.perf_counter()
        plain = zarr.open_group("s3://bench/plain.zarr", mode="w", storage_options=options, zarr_format=3)
        names = lay_out(plain, attrs, meta, values)
        write_shards(plain, names, values, shards, threads=4)
        plain.attrs["complete"] = True
        results["write_plain_s"] = time.perf_counter() - start
        time.sleep(1)  # the server's log catches up
        results["requests_write_plain"], counted = requests() - counted, requests()
        results["objects_plain"], results["bytes_plain"] = bucket_objects(endpoint, "plain.zarr")
        say(f"plain write {results['write_plain_s']:.1f} s")

        start = time.perf_counter()
        repo = icechunk_repo(endpoint, "ic-one")
        session = repo.writable_session("main")
        group = zarr.open_group(session.store, mode="w", zarr_format=3)
        lay_out(group, attrs, meta, values)
        write_shards(group, names, values, shards, threads=4)
        group.attrs["complete"] = True
        written = time.perf_counter()
        snapshot = session.commit("the whole store")
        results["write_icechunk_one_commit_s"] = time.perf_counter() - start
        results["icechunk_commit_s"] = time.perf_counter() - written
        time.sleep(1)
        results["requests_write_icechunk"], counted = requests() - counted, requests()
        results["objects_icechunk"], results["bytes_icechunk"] = bucket_objects(endpoint, "ic-one")
        say(f"icechunk write {results['write_icechunk_one_commit_s']:.1f} s")

        start = time.perf_counter()
        repo_each = icechunk_repo(endpoint, "ic-each")
        session = repo_each.writable_session("main")
        group = zarr.open_group(session.store, mode="w", zarr_format=3)
        lay_out(group, attrs, meta, values)
        session.commit("layout")
        for bounds in shards:  # one writer; a commit per shard: resumable at shard granularity
            session = repo_each.writable_session("main")
            write_shards(zarr.open_group(session.store, mode="r+"), names, values, [bounds], threads=1)
            session.commit(f"images {bounds[0]}-{bounds[1] - 1}")
        results["write_icechunk_commit_per_shard_s"] = time.perf_counter() - start
        time.sleep(1)
        results["requests_write_icechunk_commit_per_shard"], counted = requests() - counted, requests()
        say(f"icechunk write, a commit per shard {results['write_icechunk_commit_per_shard_s']:.1f} s")

        # 2. Reading every shard back.
        plain_read = zarr.open_group("s3://bench/plain.zarr", mode="r", storage_options=options)
        ic_read = zarr.open_group(repo.readonly_session(snapshot_id=snapshot).store, mode="r")
        results["read_plain_s"] = min(read_all(plain_read, names, n, shard) for _ in range(2))
        time.sleep(1)
        results["requests_read_plain_twice"], counted = requests() - counted, requests()
        results["read_icechunk_s"] = min(read_all(ic_read, names, n, shard) for _ in range(2))
        time.sleep(1)
        results["requests_read_icechunk_twice"], counted = requests() - counted, requests()
        say(f"reads {results['read_plain_s']:.1f} s, {results['read_icechunk_s']:.1f} s")
        for name in names:
            assert np.array_equal(plain_read[name][:], ic_read[name][:], equal_nan=True), name

        # 3. A writer stopped half-way: its session is dropped uncommitted (what a killed process leaves).
        repo_crash = icechunk_repo(endpoint, "ic-crash")
        session = repo_crash.writable_session("main")
        group = zarr.open_group(session.store, mode="w", zarr_format=3)
        lay_out(group, attrs, meta, values)
        session.commit("layout")
        before = bucket_objects(endpoint, "ic-crash")
        session = repo_crash.writable_session("main")
        write_shards(zarr.open_group(session.store, mode="r+"), names, values, shards[: len(shards) // 2], threads=4)
        del session
        after = bucket_objects(endpoint, "ic-crash")
        seen = zarr.open_group(repo_crash.readonly_session("main").store, mode="r")
        results["crash_icechunk"] = {
            "orphaned_objects": after[0] - before[0], "orphaned_bytes": after[1] - before[1],
            "images_visible_after": int(seen["done"][:].sum()),
            "images_to_rewrite": n,
        }
        start = time.perf_counter()
        session = repo_crash.writable_session("main")
        write_shards(zarr.open_group(session.store, mode="r+"), names, values, shards, threads=4)
        session.commit("rewritten")
        results["crash_icechunk"]["resume_s"] = time.perf_counter() - start
        results["crash_icechunk"]["orphans_after_gc"] = "garbage_collect(older_than) removes them once past the "\
                                                          "given age"

        crash = zarr.open_group("s3://bench/crash.zarr", mode="w", storage_options=options, zarr_format=3)
        lay_out(crash, attrs, meta, values)
        write_shards(crash, names, values, shards[: len(shards) // 2], threads=4)
        done = zarr.open_group("s3://bench/crash.zarr", mode="r", storage_options=options)["done"][:]
        todo = [(a, b) for a, b in shards if not done[a:b].all()]
        start = time.perf_counter()
        write_shards(crash, names, values, todo, threads=4)
        crash.attrs["complete"] = True
        results["crash_plain"] = {"images_kept": int(done.sum()), "images_to_rewrite": n - int(done.sum()),
                                  "resume_s": time.perf_counter() - start}

        say("crash: " + json.dumps([results["crash_icechunk"], results["crash_plain"]]))
        # 4. Two cooperative writers, each in its own process with half the shards.
        halves = [shards[0::2], shards[1::2]]
        context = multiprocessing.get_context("spawn")
        repo_coop = icechunk_repo(endpoint, "ic-coop")
        session = repo_coop.writable_session("main")
        lay_out(zarr.open_group(session.store, mode="w", zarr_format=3), attrs, meta, values)
        session.commit("layout")
        start = time.perf_counter()
        session = repo_coop.writable_session("main")
        with ProcessPoolExecutor(2, mp_context=context) as pool:
            forks = list(pool.map(_fork_worker, [(session.fork(), names, values, half) for half in halves]))
        session.merge(*forks)
        session.commit("two writers")
        results["cooperative_icechunk_s"] = time.perf_counter() - start
        merged = zarr.open_group(repo_coop.readonly_session("main").store, mode="r")
        results["cooperative_icechunk_images"] = int(merged["done"][:].sum())

        # Two sessions committing to one branch at once: the second must rebase.
        first, second = repo_coop.writable_session("main"), repo_coop.writable_session("main")
        zarr.open_group(first.store, mode="r+").attrs["note"] = "first"
        zarr.open_group(second.store, mode="r+")["done"][0:1] = True
        first.commit("first")
        try:
            second.commit("second")
            results["concurrent_commit"] = "committed without conflict"
        except icechunk.ConflictError:
            second.rebase(icechunk.ConflictDetector())
            second.commit("second, rebased")
            results["concurrent_commit"] = "ConflictError, then rebase(ConflictDetector()) and commit"

        plain_coop = zarr.open_group("s3://bench/coop.zarr", mode="w", storage_options=options, zarr_format=3)
        lay_out(plain_coop, attrs, meta, values)
        start = time.perf_counter()
        with ProcessPoolExecutor(2, mp_context=context) as pool:
            list(pool.map(_plain_worker, [("s3://bench/coop.zarr", options, names, values, half) for half in halves]))
        plain_coop.attrs["complete"] = True
        results["cooperative_plain_s"] = time.perf_counter() - start
        coop = zarr.open_group("s3://bench/coop.zarr", mode="r", storage_options=options)
        results["cooperative_plain_images"] = int(coop["done"][:].sum())
    finally:
        server.kill()
        server.wait()
    text = json.dumps(results, indent=2, default=str)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    main()
