"""A store on object storage against the same store on local disk, on a loopback S3 server.

The server is moto's S3 application (what tests/test_object_storage.py starts), served here by
werkzeug in a process of its own on 127.0.0.1, with a WSGI middleware around it that counts the
requests it answers (GETs of chunk objects apart) and can sleep a set time before answering each
request: ``--latency-ms 20`` is that sleep, standing in for the round trip of real object storage
(the sleep releases the GIL, so requests in flight at once wait out their latency together).
Parts (``--parts``, all by default):

* ``verify``: ``skd cache-verify`` of the demo store, local and from the bucket, in turn, ``--repeats``
  times each; the median of each and their ratio.
* ``train``: ``skd train-student`` (the demo's student with pi,pa from the demo's bank of views, no
  loader workers: each read's wait counts in full) for ``--epochs`` epochs from the local store;
  from the bucket through the local read cache (``--cache-dir``, empty at the start); the same with
  ``--latency-ms``; and one epoch from the bucket with no read cache, with and without the latency. Iteration times are the differences of
  ``elapsed_s`` in log.jsonl at ``log_every 1`` (data waits included), median over the first epoch
  and over the epochs after it; GET requests for chunk objects per epoch.
* ``caches``: one process reading the first ``--images`` images' stored view 0 (``view_log_probs``,
  ``view_features``) twice over ("epochs"), through the read cache (``pipeline.cache.readcache``),
  fsspec's ``simplecache::``, ``filecache::`` and ``blockcache::`` chained in front of s3, zarr's
  ``CacheStore`` (zarr.experimental) over a local store, and nothing; and the local store itself:
  seconds and chunk GETs per epoch, and whether the values equal the local store's.
* ``kills``: ``--kills`` runs of ``skd cache-teacher`` (a small random teacher, 160 small synthetic
  images in 10 shards) writing to the bucket, each SIGKILLed at a
  random time (uniform over an uninterrupted run's duration), then re-run to completion. The killed
  writer's lease is aged past its expiry (standing in for the 10 minutes a lease lasts); the store is
  then compared object for object with an uninterrupted store (root metadata without its creation
  time and the teacher's mIoU, which a resumed run does not record), checked with ``skd cache-verify``, and every shard flagged done is checked against the
  uninterrupted store's objects. Counts corrupt stores and lost shards.

    nice -n 10 python bench/object_storage.py --out docs/results/object_storage
    nice -n 10 python bench/object_storage.py --parts kills --kills 3 --out /tmp/os   # quick

JSON per part in --out (``<part>_<commit>.json``) with the command, commit and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")

BUCKET = "bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# The demo's student with pixel- and pair-wise terms, its batches read in the training process
# (no loader workers): every read's wait is in the iteration time, none hidden by prefetching.
STUDENT = ["--model", "pspnet_resnet18", "--width", "0.125", "--losses", "pi,pa", "--workers", "0"]


# -- the server ----------------------------------------------------------------------------------

class Middleware:
    """Counts requests (GETs of chunk objects apart), sleeps ``latency`` seconds before each; the
    bench talks to it on /__bench__/ (stats, reset, latency)."""

    def __init__(self, app):
        self.app, self.latency, self.lock = app, 0.0, threading.Lock()
        self.counts = {"requests": 0, "chunk_gets": 0, "gets": 0}

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path.startswith("/__bench__/"):
            what = path.split("/")[2]
            if what == "latency":
                self.latency = float(environ.get("QUERY_STRING", "ms=0").split("=")[1]) / 1000
            elif what == "reset":
                with self.lock:
                    self.counts = dict.fromkeys(self.counts, 0)
            start_response("200 OK", [("Content-Type", "application/json")])
            return [json.dumps({**self.counts, "latency_ms": self.latency * 1000}).encode()]
        with self.lock:
            self.counts["requests"] += 1
            if environ["REQUEST_METHOD"] == "GET":
                self.counts["gets"] += 1
                self.counts["chunk_gets"] += "/c/" in path
        if self.latency:
            time.sleep(self.latency)
        return self.app(environ, start_response)


def serve(port: int) -> None:
    import logging

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    make_server("127.0.0.1", port, Middleware(DomainDispatcherApplication(create_backend_app)), threaded=True,
                request_handler=MotoRequestHandler).serve_forever()


class Server:
    """The S3 server in a process of its own (its request handling then takes no time from ours)."""

    def __init__(self):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(self.port)])
        for _ in range(200):
            try:
                self.call("stats")
                break
            except OSError:
                time.sleep(0.1)
        self.options = {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing",
                        "client_kwargs": {"region_name": "us-east-1"}}
        self.env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint, "OMP_NUM_THREADS": "1"}

    def call(self, what: str, query: str = "") -> dict:
        with urllib.request.urlopen(f"{self.endpoint}/__bench__/{what}{'?' + query if query else ''}") as answer:
            return json.loads(answer.read())

    def latency(self, ms: float) -> None:
        self.call("latency", f"ms={ms}")

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(**self.options, skip_instance_cache=True)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


# -- helpers -------------------------------------------------------------------------------------

def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def machine() -> str:
    import torch

    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), PyTorch {torch.__version__}"


def skd(args: list[str], env: dict, log=None, timeout: float | None = None) -> float:
    """``skd ARGS`` in a subprocess; its wall time in seconds (raises if it fails)."""
    tic = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cli", "--quiet", *args], cwd=ROOT, env=env, check=True, timeout=timeout,
                   stdout=log or subprocess.DEVNULL, stderr=log or subprocess.DEVNULL)
    return time.perf_counter() - tic


def write(out: Path, part: str, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": commit(), "machine": machine(),
              "load_average_at_end": os.getloadavg(), **result}
    path = out / f"{part}_{result['commit']}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"-> {path}", flush=True)


def upload(server: Server, store: Path, key: str) -> str:
    fs = server.fs()
    if not fs.exists(BUCKET):
        fs.call_s3("create_bucket", Bucket=BUCKET)
    fs.put(str(store), f"{BUCKET}/{key}", recursive=True)
    return f"s3://{BUCKET}/{key}"


# -- parts ---------------------------------------------------------------------------------------

def part_verify(server: Server, store: Path, url: str, repeats: int, log) -> dict:
    times = {"local": [], "s3": []}
    for _ in range(repeats):
        times["local"].append(skd(["cache-verify", str(store)], server.env, log))
        times["s3"].append(skd(["cache-verify", url], server.env, log))
        print(f"verify: local {times['local'][-1]:.1f} s, s3 {times['s3'][-1]:.1f} s", flush=True)
    local, s3 = statistics.median(times["local"]), statistics.median(times["s3"])
    return {"store": str(store), "url": url, "seconds": times, "median_local_s": local, "median_s3_s": s3,
            "ratio": s3 / local}


def iteration_times(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    elapsed = [r["elapsed_s"] for r in records if "elapsed_s" in r and "iteration" in r]
    return [b - a for a, b in zip([0.0, *elapsed[:-1]], elapsed)]


def part_train(server: Server, store: Path, url: str, epochs: int, latency_ms: float, repeats: int, work: Path,
               log) -> dict:
    import zarr

    images = len(zarr.open_group(str(store), mode="r").attrs["dataset"]["ids"])
    config = work / "bench.yaml"
    import yaml

    recipe = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    recipe["train"] |= {"log_every": 1, "log_grad_norms": False, "checkpoint_every": 100000}
    config.write_text(yaml.safe_dump(recipe))
    per_epoch = images // recipe["train"]["batch_size"]
    # (name, store, latency, read cache, epochs): the runs without a read cache read the bucket every
    # epoch alike, so one epoch of each says what they cost.
    # The runs with a read cache are repeated in turn with the local one (the machine's load drifts).
    runs = [("local", str(store), 0.0, False, epochs), ("s3 + read cache", url, 0.0, True, epochs),
            (f"s3 + read cache, {latency_ms:g} ms", url, latency_ms, True, epochs)] * repeats + \
           [("s3, no read cache", url, 0.0, False, 1), (f"s3, no read cache, {latency_ms:g} ms", url, latency_ms, False, 1)]
    rows = []
    for name, cache, latency, read_cache, run_epochs in runs:
        out = work / name.replace(" ", "_").replace(",", "").replace("+", "")
        shutil.rmtree(out, ignore_errors=True)
        server.latency(latency)
        server.call("reset")
        cache_dir = work / "read-cache"
        shutil.rmtree(cache_dir, ignore_errors=True)
        wall = skd(["train-student", "--config", str(config), *STUDENT, "--cache", cache,
                    "--iterations", str(run_epochs * per_epoch),
                    "--out", str(out), *(["--cache-dir", str(cache_dir)] if read_cache else [])], server.env, log)
        counts = server.call("stats")
        times = iteration_times(out)
        first, after = times[:per_epoch], times[per_epoch:]
        rows.append({"run": name, "latency_ms": latency, "read_cache": read_cache, "wall_s": wall,
                     "median_first_epoch_s": statistics.median(first[1:]),  # the first step includes start-up
                     "median_after_first_epoch_s": statistics.median(after) if after else None,
                     "requests": counts["requests"], "chunk_gets": counts["chunk_gets"], "iteration_s": times})
        print(f"train {name}: first epoch {rows[-1]['median_first_epoch_s'] * 1000:.0f} ms/it, after "
              f"{(rows[-1]['median_after_first_epoch_s'] or 0) * 1000:.0f} ms/it, {counts['chunk_gets']} chunk GETs",
              flush=True)
    server.latency(0)
    # Per kind of run: medians over the iterations of all its repeats, and their ratio to local's.
    summary = {}
    for name in dict.fromkeys(row["run"] for row in rows):
        same = [row for row in rows if row["run"] == name]
        first = [t for row in same for t in row["iteration_s"][1:per_epoch]]
        after = [t for row in same for t in row["iteration_s"][per_epoch:]]
        summary[name] = {"repeats": len(same), "median_first_epoch_s": statistics.median(first),
                         "median_after_first_epoch_s": statistics.median(after) if after else None,
                         "chunk_gets_per_run": [row["chunk_gets"] for row in same]}
    local = summary["local"]
    for entry in summary.values():
        for key in ("median_first_epoch_s", "median_after_first_epoch_s"):
            if entry[key] and local[key]:
                entry[key.replace("median_", "ratio_")] = entry[key] / local[key]
    return {"images": images, "epochs": epochs, "iterations_per_epoch": per_epoch, "summary": summary, "runs": rows,
            "recipe": "configs/demo.yaml with train.log_every 1, log_grad_norms false; " + " ".join(STUDENT)}


def part_caches(server: Server, store: Path, url: str, latency_ms: float, images: int, work: Path) -> dict:
    """Every variant in a subprocess of its own (a fresh process, as a training run is)."""
    rows = []
    for variant in ("local", "none", "readcache", "simplecache", "filecache", "blockcache", "zarr-cachestore"):
        for latency in ((0.0,) if variant == "local" else (0.0, latency_ms)):
            server.latency(latency)
            cache = work / f"cache-{variant}"
            shutil.rmtree(cache, ignore_errors=True)
            result = subprocess.run([sys.executable, __file__, "--read-variant", variant, "--store", str(store),
                                     "--url", url, "--endpoint", server.endpoint, "--cache-folder", str(cache),
                                     "--images", str(images)],
                                    cwd=ROOT, env=server.env, capture_output=True, text=True, timeout=3600)
            row = {"variant": variant, "latency_ms": latency}
            if result.returncode == 0:
                row |= json.loads(result.stdout.strip().splitlines()[-1])
            else:
                row["error"] = (result.stderr.strip().splitlines() or ["?"])[-1][:300]
            rows.append(row)
            print(f"caches {variant} {latency:g} ms: {row}", flush=True)
    server.latency(0)
    return {"images": images, "arrays": ["view_log_probs", "view_features"], "rows": rows}


def read_variant(variant: str, store: str, url: str, endpoint: str, folder: str, images: int) -> None:
    """One process of ``part_caches``: two passes over the first ``images`` images' view 0; prints JSON."""
    import numpy as np
    import zarr

    from pipeline.cache.readcache import ReadCache, open_remote

    s3 = {"endpoint_url": endpoint, "key": "testing", "secret": "testing", "client_kwargs": {"region_name": "us-east-1"}}
    if variant == "local":
        group = zarr.open_group(store, mode="r")
    elif variant == "none":
        group = zarr.open_group(open_remote(url, s3), mode="r")
    elif variant == "readcache":
        group = zarr.open_group(open_remote(url, s3, ReadCache(Path(folder), 2**40)), mode="r")
    elif variant in ("simplecache", "filecache", "blockcache"):
        group = zarr.open_group(f"{variant}::{url}", mode="r",
                                storage_options={"s3": s3, variant: {"cache_storage": folder}})
    else:  # zarr's own cache store, persisting to a local store
        from zarr.experimental.cache_store import CacheStore
        from zarr.storage import LocalStore

        group = zarr.open_group(CacheStore(open_remote(url, s3), cache_store=LocalStore(folder)), mode="r")
    local = zarr.open_group(store, mode="r")
    n = min(local["view_log_probs"].shape[0], images)
    arrays = ("view_log_probs", "view_features")
    handles = {name: group[name] for name in arrays}
    result, equal = {}, True
    for epoch in (1, 2):
        before = stats(endpoint)
        tic = time.perf_counter()
        for i in range(n):
            for name in arrays:
                values = handles[name][i, 0]
                if epoch == 1:
                    equal &= bool(np.array_equal(values, local[name][i, 0], equal_nan=True))
        result[f"epoch{epoch}_s"] = time.perf_counter() - tic
        result[f"epoch{epoch}_chunk_gets"] = stats(endpoint)["chunk_gets"] - before["chunk_gets"]
    result["equal_to_local"] = equal
    result["cached_bytes"] = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) \
        if Path(folder).exists() else 0
    print(json.dumps(result))


def stats(endpoint: str) -> dict:
    with urllib.request.urlopen(f"{endpoint}/__bench__/stats") as answer:
        return json.loads(answer.read())


def part_kills(server: Server, kills: int, seed: int, work: Path, log, out: Path) -> dict:
    import torch
    import yaml
    import zarr

    from pipeline.models import build_model
    from pipeline.train.checkpoint import save_checkpoint

    # What is tested is the write protocol, not the teacher: a small one (random weights, seeded) on
    # small images keeps a run short enough for many kills, with ten shards of 16 images to cut into.
    torch.manual_seed(0)
    arch = {"name": "pspnet_resnet18", "num_classes": 8, "width": 0.125}
    teacher = work / "kills-teacher.pt"
    save_checkpoint(teacher, {"arch": arch, "model": build_model(**arch).state_dict()})
    config = work / "kills.yaml"
    config.write_text(yaml.safe_dump({"data": {"dataset": "synthetic", "options": {"size": [64, 64], "length": 160}},
                                      "cache": {"batch_size": 16, "feature_pool": 2}}))
    fs = server.fs()
    if not fs.exists(BUCKET):
        fs.call_s3("create_bucket", Bucket=BUCKET)

    def command(key: str) -> list[str]:
        return ["cache-teacher", "--config", str(config), "--teacher", str(teacher), "--cache", f"s3://{BUCKET}/{key}",
                "--workers", "0", "--device", "cpu"]

    def objects(key: str) -> dict[str, bytes]:
        prefix = f"{BUCKET}/{key}"
        return {k[len(prefix):]: fs.cat_file(k) for k in fs.find(prefix) if not k.endswith(".lease")}

    def root_attrs(data: bytes) -> dict:
        # Not compared: the creation time, and the teacher's mIoU, which only a run that wrote every
        # shard itself records (a resumed run leaves it to cache-stats --labels).
        attrs = json.loads(data)["attributes"]
        return {k: v for k, v in attrs.items() if k not in ("created", "teacher_miou")}

    reference_s = skd(command("reference.zarr"), server.env, log)
    reference = objects("reference.zarr")
    print(f"kills: uninterrupted write {reference_s:.1f} s, {len(reference)} objects", flush=True)
    rng = random.Random(seed)
    rows = []
    for trial in range(kills):
        key = f"killed-{trial}.zarr"
        delay = rng.uniform(0.5, reference_s)
        env = {**server.env, "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "cli", "--quiet", *command(key)], cwd=ROOT, env=env,
                                stdout=log, stderr=log)
        try:
            proc.wait(timeout=delay)
            killed = False
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = True
        fs.invalidate_cache()
        row = {"trial": trial, "kill_after_s": delay, "killed": killed}
        # Right after the kill: a store that says complete must be the whole store.
        root = f"{BUCKET}/{key}/zarr.json"
        said_complete = fs.exists(root) and json.loads(fs.cat_file(root))["attributes"].get("complete", False)
        row["read_as_complete_after_kill"] = bool(said_complete)
        row["complete_but_not_whole_after_kill"] = bool(said_complete) and any(
            objects(key).get(k) != v for k, v in reference.items() if k != "/zarr.json")
        try:  # how far the killed run got: images flagged done
            row["images_done_at_kill"] = int(zarr.open_group(f"s3://{BUCKET}/{key}", mode="r",
                                                             storage_options=server.options)["done"][:].sum())
        except Exception:  # noqa: BLE001 -- killed before the store was laid out
            row["images_done_at_kill"] = None
        lease = f"{BUCKET}/{key}.lease"
        if fs.exists(lease):  # a killed writer's lease, aged past its expiry
            held = json.loads(fs.cat_file(lease))
            fs.pipe_file(lease, json.dumps({**held, "expires": time.time() - 1}).encode())
        row["resume_s"] = skd(command(key), server.env, log)
        got = objects(key)
        differing = sorted(k for k in set(reference) | set(got) if k != "/zarr.json" and reference.get(k) != got.get(k))
        row["objects_differing"] = differing[:10]
        got_root, want_root = root_attrs(got.get("/zarr.json", b'{"attributes": {}}')), root_attrs(reference["/zarr.json"])
        row["root_keys_differing"] = sorted(k for k in set(got_root) | set(want_root) if got_root.get(k) != want_root.get(k))
        row["root_differs"] = bool(row["root_keys_differing"])
        verify = subprocess.run([sys.executable, "-m", "cli", "--quiet", "cache-verify", f"s3://{BUCKET}/{key}"],
                                cwd=ROOT, env=server.env, capture_output=True, text=True)
        row["verify_ok"] = verify.returncode == 0
        group = zarr.open_group(f"s3://{BUCKET}/{key}", mode="r", storage_options=server.options)
        done, shard = group["done"][:], int(group.attrs["shard_images"])
        lost = 0
        for start in range(0, len(done), shard):
            index = start // shard
            shard_keys = [k for k in reference if f"/c/{index}/" in k]
            if done[start:start + shard].all() and any(got.get(k) != reference[k] for k in shard_keys):
                lost += 1
            elif not done[start:start + shard].all():
                lost += 1  # finished, yet a shard is not flagged done
        row["lost_shards"] = lost
        row["corrupt"] = bool(differing or row["root_differs"] or not row["verify_ok"]
                              or row["complete_but_not_whole_after_kill"])
        rows.append(row)
        print(f"kill {trial}: after {delay:.1f} s (killed: {killed}, {row['images_done_at_kill']} images done), "
              f"corrupt {row['corrupt']}, lost shards {lost}",
              flush=True)
        fs.rm(f"{BUCKET}/{key}", recursive=True)
        result = {"uninterrupted_s": reference_s, "objects": len(reference), "seed": seed, "requested": kills,
                  "completed": len(rows), "trials": rows, "killed": sum(r["killed"] for r in rows),
                  "corrupt_stores": sum(r["corrupt"] for r in rows), "lost_shards": sum(r["lost_shards"] for r in rows),
                  "recipe": "synthetic 64x64, 160 images (10 shards), feature_pool 2; pspnet_resnet18 x0.125 "
                            "teacher, random weights (seed 0)"}
        write(out, "kills", result)  # after every trial: a stopped bench keeps what it measured
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="verify,train,caches,kills")
    p.add_argument("--store", default="runs/demo/synthetic.zarr", help="the demo store (make demo)")
    p.add_argument("--repeats", type=int, default=2, help="cache-verify runs, and training runs with a read cache, of each kind")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--images", type=int, default=128, help="images read in each pass of the caches part")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/object_storage")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--read-variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--url", default=None, help=argparse.SUPPRESS)
    p.add_argument("--endpoint", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache-folder", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return serve(args.serve)
    if args.read_variant:
        return read_variant(args.read_variant, args.store, args.url, args.endpoint, args.cache_folder, args.images)

    store, out = (ROOT / args.store).resolve(), ROOT / args.out
    if not (store / "zarr.json").is_file():
        sys.exit(f"no store at {store}: run make demo first")
    work = Path(args.work or tempfile.mkdtemp(prefix="skd-object-storage-"))
    work.mkdir(parents=True, exist_ok=True)
    server = Server()
    try:
        with open(work / "log.txt", "a") as log:
            parts = args.parts.split(",")
            url = upload(server, store, "demo/synthetic.zarr") if set(parts) & {"verify", "train", "caches"} else None
            if "verify" in parts:
                write(out, "verify", part_verify(server, store, url, args.repeats, log))
            if "train" in parts:
                write(out, "train", part_train(server, store, url, args.epochs, args.latency_ms, args.repeats, work, log))
            if "caches" in parts:
                write(out, "caches", part_caches(server, store, url, args.latency_ms, args.images, work))
            if "kills" in parts:
                part_kills(server, args.kills, args.seed, work, log, out)
    finally:
        server.stop()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
