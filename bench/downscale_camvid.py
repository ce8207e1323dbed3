"""A reduced-resolution copy of CamVid in its SegNet layout, for experiments a CPU can finish.

    python bench/downscale_camvid.py ../shared/data/camvid runs/camvid-half --factor 0.5

Images are resized with antialiased bilinear filtering, labels with nearest neighbour (class ids
are never blended). The copy is then a dataset like any other: ``--dataset camvid --data-root DST``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image


def downscale(src: Path, dst: Path, factor: float) -> int:
    count = 0
    for split in ("train", "val", "test"):
        if not (src / split).is_dir():
            continue
        for folder, resample in ((split, Image.Resampling.BILINEAR), (f"{split}annot", Image.Resampling.NEAREST)):
            (dst / folder).mkdir(parents=True, exist_ok=True)
            for path in sorted((src / folder).iterdir()):
                out = dst / folder / path.name
                if out.exists():
                    continue
                with Image.open(path) as image:
                    size = (round(image.width * factor), round(image.height * factor))
                    image.resize(size, resample, reducing_gap=None).save(out.with_suffix(".tmp.png"), format="PNG")
                out.with_suffix(".tmp.png").rename(out)  # a killed run leaves no half-written file
                count += 1
    return count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="CamVid root (train/, trainannot/, val/, valannot/)")
    p.add_argument("dst", type=Path)
    p.add_argument("--factor", type=float, default=0.5)
    args = p.parse_args()
    print(f"{downscale(args.src, args.dst, args.factor)} files written to {args.dst}")


if __name__ == "__main__":
    main()
