"""Full-resolution image processing on the CPU: 1920x1080 JPEGs -> uint8 views (8 crops + the global view's
source), as DataLoader workers make them; then their normalisation, which runs where the batch is placed.

python benchmarks/processing_cpu.py [--images 64] [--workers 2]

Three numbers: one process, `--workers` DataLoader processes over the same images, and the whole data
loader (shards on disk -> layout -> packing -> pixels -> collated batches) with `--workers` workers.
Also a per-stage breakdown of one image, which says what limits the rate, with the device half timed on the
CPU (`model_pixels_ms`; on a GPU it is a small part of a step).
"""

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from step3vl_train.data.config import DataConfig
from step3vl_train.data.loader import PackedLoader
from step3vl_train.data.shards import ShardSetWriter
from step3vl_train.processing.config import ProcessorConfig
from step3vl_train.processing.images import load_image
from step3vl_train.processing.pixels import PixelSpec, PixelViews, image_views, model_pixels
from step3vl_train.processing.processor import load_processor

REPO = Path(__file__).resolve().parents[1]


def photo_jpegs(count: int) -> list[bytes]:
    """A real photo at 1920x1080, shifted per copy so no two files are the same."""
    base = Image.open(REPO / "data" / "samples" / "chelsea.png").convert("RGB").resize((1920, 1080), Image.BICUBIC)
    out = []
    for i in range(count):
        buffer = io.BytesIO()
        base.rotate(i % 7, translate=(i, -i)).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


class Pixels(Dataset):
    def __init__(self, jpegs: list[bytes], cfg: ProcessorConfig):
        self.jpegs = jpegs
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, index: int) -> int:
        views = image_views(load_image(self.jpegs[index]), self.cfg)
        assert views.windows.shape == (8, 3, 504, 504)
        return views.windows.shape[0]


def rate(fn, count: int) -> float:
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


def breakdown(jpeg: bytes, cfg: ProcessorConfig) -> dict[str, float]:
    from step3vl_train.processing import pixels as px

    image = load_image(jpeg)
    plan = px.plan_crops(image.width, image.height, cfg)
    canvas = image.resize(plan.canvas_size, Image.BILINEAR)
    views = PixelViews.from_images([image_views(image, cfg)], PixelSpec.from_config(cfg))
    stages = {
        "decode": lambda: load_image(jpeg),
        "global_source": lambda: px._chw(image),
        "canvas_resize": lambda: image.resize(plan.canvas_size, Image.BILINEAR),
        "windows": lambda: px._windows(canvas, plan),
        "model_pixels": lambda: model_pixels(views),
    }
    out = {}
    for name, fn in stages.items():
        fn()
        start = time.perf_counter()
        for _ in range(10):
            fn()
        out[name + "_ms"] = round((time.perf_counter() - start) * 100, 1)
    return out


def loader_rate(jpegs: list[bytes], workers: int, cfg: ProcessorConfig) -> float:
    with tempfile.TemporaryDirectory() as folder:
        writer = ShardSetWriter(folder, max_samples=16)
        for i, data in enumerate(jpegs):
            record = {"text": [{"type": "image"}, {"type": "text", "text": f"photo {i}"}]}
            writer.write(f"photo-{i:04d}", record, [data], ["jpg"])
        writer.close()
        data = DataConfig.from_dict(
            {"sources": [{"name": "photos", "paths": [f"{folder}/*.tar"]}], "num_workers": workers, "max_epochs": 1}
        )
        loader = PackedLoader(data, load_processor("tiny", vars(cfg)))
        start = time.perf_counter()
        for _ in loader:
            pass
        return loader.stats().images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    cfg = ProcessorConfig()
    torch.set_num_threads(1)  # one core a process, as in DataLoader workers
    jpegs = photo_jpegs(args.images)
    dataset = Pixels(jpegs, cfg)
    single = rate(lambda: [dataset[i] for i in range(len(dataset))], len(dataset))
    loader = DataLoader(dataset, batch_size=None, num_workers=args.workers)
    parallel = rate(lambda: list(loader), len(dataset))
    report = {
        "images": args.images,
        "workers": args.workers,
        "images_per_s_1_process": round(single, 1),
        f"images_per_s_{args.workers}_workers": round(parallel, 1),
        f"images_per_s_loader_{args.workers}_workers": round(loader_rate(jpegs, args.workers, cfg), 1),
        **breakdown(jpegs[0], cfg),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
