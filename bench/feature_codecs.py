"""Ways to store the teacher's pooled features, compared on the same exact features: bytes per image
and the pair-wise loss error they cause (what docs/CACHE.md's choice of codec rests on).

Runs the teacher (float32, whole images) over a split, max-pools its PSP features as the store does,
and encodes them in memory with zarr's own codecs, one chunk per image:

- format 1: float16, zstd level 3 (the baseline of the bytes goal);
- 8-bit codes with one scale and offset per image (format 2 before per-channel scaling);
- 8-bit codes with one scale and offset per image and channel (format 2 until position scales);
- each position divided by its largest |value| (float16), then 127 levels per image and channel
  (format 2 now: the store's own encoder), and the same at 255 and 63 levels;
- each position divided by its largest |value|, then per image and channel 63, 55, 51 or 47
  levels above 0 and a finer step below (2 levels down to the smallest value): the leaky ReLU's
  negative side gets levels of its own;
- uint16 codes of one fixed step per image (a multiple of the features' RMS);
- the top-k PCA coordinates (fitted on the first half of the images), 8 bits per coordinate and channel;
- BitRound (float16 keeping m mantissa bits) with bit-shuffled zstd.

The pair-wise error is |L(decoded) - L(exact)| / L(exact), worst image, against a random student,
for nodes of 1 and 2 cells and a quarter and half of the map (as bench/cache_fidelity.py).

    python bench/feature_codecs.py --teacher T.pt --dataset camvid --data-root ../shared/data/camvid --split val
    python bench/feature_codecs.py --teacher T.pt --dataset synthetic --options '{"size": [1024, 2048], "length": 8}'
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from zarr.codecs import BloscCodec, Delta, FixedScaleOffset, ZstdCodec
from zarr.codecs.numcodecs import BitRound

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cache.codecs import FEATURE_LEVELS, encode_features  # noqa: E402
from pipeline.data import build_dataset  # noqa: E402
from pipeline.data.transforms import normalize  # noqa: E402
from pipeline.distill.losses import pairwise_loss  # noqa: E402
from pipeline.inference import predict  # noqa: E402
from pipeline.train.checkpoint import model_from_checkpoint  # noqa: E402

warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")


def encoded(values: np.ndarray, dtype: str, filters: list | None, compressors: list) -> tuple[float, np.ndarray]:
    """(bytes per image, decoded values) of ``values`` (N, C, h, w) stored with these codecs."""
    store = zarr.storage.MemoryStore()
    array = zarr.create_array(store, shape=values.shape, chunks=(1, *values.shape[1:]), dtype=dtype,
                              filters=filters, compressors=compressors, fill_value=0)
    array[:] = values.astype(dtype)
    size = sum(len(v.to_bytes()) for k, v in store._store_dict.items() if not k.endswith("zarr.json"))
    return size / len(values), array[:].astype(np.float32)


def eight_bits() -> list:
    return [FixedScaleOffset(offset=0, scale=255, dtype="<f4", astype="u1"), Delta(dtype="u1")]


def pairwise_errors(exact: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    n, _, h, w = exact.shape
    errors: dict[str, float] = {}
    for i in range(n):
        student = torch.randn(1, 32, h, w, generator=torch.Generator().manual_seed(i))
        for node in ((1, 1), (2, 2), (max(1, h // 4), max(1, w // 4)), (max(1, h // 2), max(1, w // 2))):
            want = pairwise_loss(student, torch.from_numpy(exact[i : i + 1]), node).item()
            got = pairwise_loss(student, torch.from_numpy(decoded[i : i + 1]), node).item()
            key = f"{node[0]}x{node[1]}"
            errors[key] = max(errors.get(key, 0.0), abs(got - want) / want)
    return errors


def two_sided(x: np.ndarray, positive: int, negative: int) -> tuple[float, np.ndarray]:
    """The store's position scales (``encode_features``), then per image and channel a step for the
    values above 0 (``positive`` levels up to the largest) and a finer one below (``negative`` levels
    down to the smallest, never coarser than the step above): the leaky ReLU's negative side, about
    1 % of the positive side's scale, gets levels of its own instead of one shared with everything
    else. Decodes with one more array per image and channel."""
    values, scale, offset, position = encode_features(torch.from_numpy(x), 1)
    scaled = values * scale[..., None, None] + offset[..., None, None]  # the features over their position scale
    flat = scaled.flatten(2)
    low, high = (-flat.amin(dim=2)).clamp(min=0), flat.amax(dim=2).clamp(min=0)
    floor = 2.0 ** -10 * flat.abs().amax(dim=(1, 2), keepdim=True)[..., 0]  # a step for channels with nothing on a side
    step_up = torch.maximum(high, floor) / positive
    step_down = torch.minimum(step_up, torch.maximum(low, floor) / negative)
    zero = torch.ceil(low / step_down).clamp(max=255 - positive)  # the code of 0, per image and channel
    step_down = torch.maximum(step_down, low / zero.clamp(min=1))
    step_up, step_down, zero = step_up[..., None, None], step_down[..., None, None], zero[..., None, None]
    codes = (zero + torch.round(scaled / torch.where(scaled < 0, step_down, step_up))).clamp(0, 255)
    size, _ = encoded(codes.numpy(), "uint8", [Delta(dtype="u1")], [ZstdCodec(level=9)])
    side, _ = encoded(position.float().numpy(), "float16", None, [ZstdCodec(level=9)])
    decoded = (codes - zero) * torch.where(codes < zero, step_down, step_up) * position.float()[:, None]
    return size + side + 12 * x.shape[1], decoded.numpy()


def schemes(x: np.ndarray) -> dict[str, tuple[float, np.ndarray]]:
    n, c, h, w = x.shape
    out = {"format 1: float16, zstd 3": encoded(x, "float16", None, [ZstdCodec(level=3)])}
    lo, hi = x.min(axis=(1, 2, 3), keepdims=True), x.max(axis=(1, 2, 3), keepdims=True)
    size, codes = encoded((x - lo) / (hi - lo), "float32", eight_bits(), [ZstdCodec(level=9)])
    out["8 bits, scale per image"] = (size + 8, codes * (hi - lo) + lo)
    lo, hi = x.min(axis=(2, 3), keepdims=True), x.max(axis=(2, 3), keepdims=True)
    span = np.maximum(hi - lo, 1e-12)
    size, codes = encoded((x - lo) / span, "float32", eight_bits(), [ZstdCodec(level=9)])
    out["8 bits, scale per image and channel"] = (size + 8 * c, codes * span + lo)
    for levels in (127, 255, 63):
        values, scale, offset, position = (t.numpy() for t in encode_features(torch.from_numpy(x), 1))
        filters = [FixedScaleOffset(offset=0, scale=levels, dtype="<f4", astype="u1"), Delta(dtype="u1")]
        size, codes = encoded(values, "float32", filters, [ZstdCodec(level=9)])
        side, _ = encoded(position.astype(np.float32), "float16", None, [ZstdCodec(level=9)])
        decoded = (codes * scale[..., None, None] + offset[..., None, None]) * position[:, None].astype(np.float32)
        label = "format 2 now: " if levels == FEATURE_LEVELS else ""
        out[f"{label}position scale, then {levels} levels per image and channel"] = (size + side + 8 * c, decoded)
    for positive, negative in ((63, 2), (55, 2), (51, 2), (47, 2)):
        out[f"position scale, then {positive} levels above 0 and {negative} below, per image and channel"] = \
            two_sided(x, positive, negative)
    lo = x.min(axis=(1, 2, 3), keepdims=True)
    rms = np.sqrt((x ** 2).mean(axis=(1, 2, 3), keepdims=True))
    for q in (32, 64):
        step = rms / q
        size, codes = encoded((x - lo) / step, "float32", [FixedScaleOffset(offset=0, scale=1, dtype="<f4", astype="u2")],
                              [BloscCodec(cname="zstd", clevel=9, shuffle="bitshuffle", typesize=2)])
        out[f"uint16, step RMS/{q} per image"] = (size + 8, codes * step + lo)
    pixels = x[: max(1, n // 2)].transpose(0, 2, 3, 1).reshape(-1, c)
    mean = pixels.mean(0)
    directions = np.linalg.svd(pixels - mean, full_matrices=False)[2].T
    for k in (c // 4, c // 2):
        z = np.einsum("nchw,ck->nkhw", x - mean[:, None, None], directions[:, :k])
        lo, hi = z.min(axis=(2, 3), keepdims=True), z.max(axis=(2, 3), keepdims=True)
        span = np.maximum(hi - lo, 1e-12)
        size, codes = encoded((z - lo) / span, "float32", eight_bits(), [ZstdCodec(level=9)])
        back = np.einsum("nkhw,ck->nchw", codes * span + lo, directions[:, :k]) + mean[:, None, None]
        out[f"PCA k={k} of {c}, 8 bits per coordinate"] = (size + 8 * k, back.astype(np.float32))
    for bits in (4, 5):
        out[f"BitRound float16, {bits} mantissa bits"] = encoded(
            x, "float16", [BitRound(keepbits=bits)], [BloscCodec(cname="zstd", clevel=9, shuffle="bitshuffle", typesize=2)])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--dataset", default="camvid")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="val")
    p.add_argument("--options", default="{}", help="dataset options as JSON")
    p.add_argument("--pool", type=int, default=4, help="max-pool factor, as the store's feature_pool")
    p.add_argument("--output", default=None)
    args = p.parse_args()

    dataset = build_dataset(args.dataset, args.data_root, args.split, **json.loads(args.options))
    teacher, _ = model_from_checkpoint(args.teacher)
    teacher.eval()
    with torch.no_grad():
        x = np.stack([F.max_pool2d(predict(teacher, normalize(dataset[i]["image"])[None])[1], args.pool, args.pool,
                                   ceil_mode=True)[0].numpy() for i in range(len(dataset))])
    rows = []
    results = schemes(x)
    format1 = results["format 1: float16, zstd 3"][0]
    for name, (size, decoded) in results.items():
        rows.append({"scheme": name, "bytes_per_image": size, "vs_format1": size / format1,
                     "pairwise_relative_error": pairwise_errors(x, decoded)})
    report = {"command": " ".join(sys.argv),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
              "images": len(x), "features_shape": list(x.shape[1:]), "raw_float32_bytes_per_image": x[0].nbytes,
              "schemes": rows}
    print(f"{len(x)} images, features {x.shape[1:]}, raw float32 {x[0].nbytes / 1024:.1f} KB/image")
    print("| scheme | KB/image | × format 1 | pair-wise error, worst image (per node size) |\n|---|---|---|---|")
    for r in rows:
        errors = ", ".join(f"{k} {100 * v:.2f} %" for k, v in r["pairwise_relative_error"].items())
        print(f"| {r['scheme']} | {r['bytes_per_image'] / 1024:.1f} | {r['vs_format1']:.3f} | {errors} |")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
