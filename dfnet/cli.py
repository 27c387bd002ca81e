"""The `dfnet` command line.

dfnet inpaint --image IMG --mask MASK --out OUT            # the shipped pretrained model
dfnet inpaint --model DIR --image IMG --mask MASK --out OUT
dfnet inpaint --model DIR --image PHOTOS/ --mask MASKS/ --out RESULTS/
dfnet import-official model_places2.pth models/places2
dfnet info --model DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from dfnet.accelerate import INFERENCE_PATHS, optimize_for_inference
from dfnet.images import is_image_file, open_image
from dfnet.inpaint import STRATEGIES, Inpainter
from dfnet.masks import MASK_CONVENTIONS
from dfnet.model import CheckpointMismatchError, DFNet, import_official_checkpoint, read_model_config
from dfnet.pretrained import PRETRAINED_NAME
from dfnet.sources import load_model


def _pairs(image: Path, mask: Path, out: Path) -> list[tuple[Path, Path, Path]]:
    """(image, mask, output) triples: one file, or every image in a folder with the mask of the
    same stem in the mask folder."""
    if image.is_file():
        return [(image, mask, out)]
    if not image.is_dir() or not mask.is_dir():
        raise SystemExit(f"error: --image and --mask must both be files or both be folders ({image}, {mask})")
    masks = {p.stem: p for p in mask.iterdir() if is_image_file(p)}
    triples = []
    for path in sorted(p for p in image.iterdir() if is_image_file(p)):
        if path.stem not in masks:
            print(f"warning: no mask for {path.name} in {mask}; skipped", file=sys.stderr)
            continue
        triples.append((path, masks[path.stem], out / f"{path.stem}.png"))
    if not triples:
        raise SystemExit(f"error: no image in {image} has a mask of the same name in {mask}")
    return triples


def cmd_inpaint(args: argparse.Namespace) -> int:
    model, _ = load_model(args.model, args.device)
    # One runner for the whole run. A compiled path compiles each image size once, when a second
    # image of that size comes: a compile takes tens of seconds, more than a lone photo takes
    # eagerly, so a single photo (or a size seen once) runs eagerly instead.
    runner = None
    if args.inference != "off":
        runner = optimize_for_inference(model, device=args.device, path=args.inference, compile_after=2)
        print(f"inference path: {runner.path.name} ({runner.reason})", file=sys.stderr)
    inpainter = Inpainter(model, args.device, runner=runner)
    triples = _pairs(Path(args.image), Path(args.mask), Path(args.out))
    failures = 0
    for image_path, mask_path, out_path in tqdm(triples, desc="inpainting", unit="image", disable=len(triples) == 1):
        try:
            image = open_image(image_path.read_bytes())  # EXIF-rotated; L, RGB or RGBA
            mask = open_image(mask_path.read_bytes())
            result = inpainter.inpaint(image, mask, mask_convention=args.mask_convention, strategy=args.strategy)
        except (OSError, ValueError) as error:  # one bad file must not stop a folder run
            failures += 1
            print(f"error: {image_path}: {error}", file=sys.stderr)
            continue
        out_path.parent.mkdir(parents=True, exist_ok=True)
        result.save(out_path)
    print(f"wrote {len(triples) - failures} image(s) to {args.out}" + (f"; {failures} failed" if failures else ""))
    return 1 if failures else 0


def cmd_import_official(args: argparse.Namespace) -> int:
    try:
        model = import_official_checkpoint(args.checkpoint, args.out_dir)
    except CheckpointMismatchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"imported {args.checkpoint} ({model.num_parameters():,} parameters, BGR→RGB) into {args.out_dir}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    meta = read_model_config(args.model)
    meta["parameters"] = DFNet.from_pretrained(args.model).num_parameters()
    print(json.dumps(meta, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfnet", description="DFNet image completion")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inpaint", help="fill the holes of one image or a folder of images")
    p.add_argument(
        "--model",
        default=PRETRAINED_NAME,
        help="model directory (config.json + model.safetensors), s3://bucket/prefix, or an official .pth; "
        "default: the shipped pretrained model",
    )
    p.add_argument("--image", required=True, help="an image file, or a folder of images")
    p.add_argument("--mask", required=True, help="a mask file, or a folder of masks named like the images")
    p.add_argument("--out", required=True, help="output file, or output folder (PNG files)")
    p.add_argument(
        "--mask-convention",
        choices=MASK_CONVENTIONS,
        default="hole-white",
        help="hole-white: white marks the hole (default, like most inpainting tools); known-white: white = keep",
    )
    p.add_argument("--strategy", choices=STRATEGIES, default="auto", help="how images meet the network's size")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--inference",
        choices=["auto", "off", *INFERENCE_PATHS],
        default="auto",
        help="how the network runs (dfnet.accelerate): auto = the fastest path for this machine "
        "(compiled; bf16 where native, else int8; each image size compiles when its second image comes), "
        "off = the plain model",
    )
    p.set_defaults(func=cmd_inpaint)

    p = sub.add_parser("import-official", help="convert the authors' released .pth into a model directory")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_import_official)

    p = sub.add_parser("info", help="print a model directory's configuration and provenance")
    p.add_argument("--model", default=PRETRAINED_NAME, help="model directory (default: the shipped model)")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
