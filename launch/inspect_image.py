"""Prints how the processor plans each image: one JSON line per image.

python launch/inspect_image.py PATH [PATH...] [--processor configs/processor/tiny.yaml]
"""

import argparse
import json
import sys

from omegaconf import OmegaConf

from step3vl_train.processing.config import ProcessorConfig
from step3vl_train.processing.crops import num_image_tokens, plan_crops
from step3vl_train.processing.images import ImageError, load_image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--processor", help="processor YAML (default: the released processor)")
    args = parser.parse_args()
    cfg = ProcessorConfig()
    if args.processor:
        cfg = ProcessorConfig.from_dict(OmegaConf.to_container(OmegaConf.load(args.processor)))
    failed = 0
    for path in args.paths:
        try:
            image = load_image(path)
        except ImageError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        plan = plan_crops(image.width, image.height, cfg)
        print(
            json.dumps(
                {
                    "path": path,
                    "width": image.width,
                    "height": image.height,
                    "num_crops": plan.num_crops,
                    "num_newlines": plan.num_newlines,
                    "num_image_tokens": num_image_tokens(plan, cfg),
                }
            )
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
