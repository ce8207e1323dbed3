"""A team's catalogue: the teacher stores under a folder or a bucket prefix, one line each."""

from __future__ import annotations

import json
from typing import Any

import fsspec

from pipeline.cache.remote import check_reachable, network_options
from pipeline.cache.store import FORMAT, redact


def list_stores(url: str, storage_options: dict | None = None) -> list[dict[str, Any]]:
    """Every skd store under ``url`` (a local folder or an fsspec URL), from its root metadata alone:
    teacher, weights hash, dataset and split, levels and views, images, complete, bytes."""
    if "://" in url:
        storage_options = network_options(url, storage_options)
        check_reachable(url, storage_options, "nothing was listed")
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    sizes = fs.find(path, detail=True)
    # A store's root holds a zarr.json; its arrays hold theirs further down.
    roots: list[str] = []
    for key in sorted((k[: -len("/zarr.json")] for k in sizes if k.endswith("/zarr.json")), key=len):
        if not any(key.startswith(root + "/") for root in roots):
            roots.append(key)
    rows = []
    for root in sorted(roots):
        attrs = json.loads(fs.cat_file(root + "/zarr.json")).get("attributes", {})
        if attrs.get("format") != FORMAT:
            continue
        teacher, dataset, prep = attrs.get("teacher", {}), attrs.get("dataset", {}), attrs.get("preprocessing", {})
        rows.append({
            "store": redact(fs.unstrip_protocol(root)) if "://" in url else root,
            "teacher": teacher.get("name"), "weights_sha256": teacher.get("weights_sha256"),
            "dataset": f"{dataset.get('name')}/{dataset.get('split')}", "images": dataset.get("num_images"),
            "levels": prep.get("levels", [1.0]), "views": (prep.get("views") or {}).get("count", 0),
            "complete": bool(attrs.get("complete")),
            "bytes": sum(info["size"] for key, info in sizes.items() if key.startswith(root + "/")),
        })
    return rows


def format_catalogue(rows: list[dict[str, Any]]) -> str:
    """The catalogue as a table a person reads."""
    if not rows:
        return "no skd teacher stores found"
    header = f"{'store':40s} {'teacher':20s} {'weights':8s} {'dataset':22s} {'images':>6s} {'levels':10s} " \
             f"{'views':>5s} {'complete':8s} {'size':>10s}"
    lines = [header]
    for r in rows:
        levels = ",".join(f"{level:g}" for level in r["levels"])
        lines.append(f"{r['store']:40s} {r['teacher'] or '-':20s} {(r['weights_sha256'] or '-')[:8]:8s} "
                     f"{r['dataset']:22s} {r['images'] or 0:6d} {levels:10s} {r['views']:5d} "
                     f"{'yes' if r['complete'] else 'NO':8s} {r['bytes'] / 2**20:8.2f} MiB")
    return "\n".join(lines)
