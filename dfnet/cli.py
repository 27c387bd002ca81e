"""The `dfnet` command line.

dfnet inpaint --image IMG --mask MASK --out OUT            # the shipped pretrained model
dfnet inpaint --model DIR --image IMG --mask MASK --out OUT
dfnet inpaint --model DIR --image PHOTOS/ --mask MASKS/ --out RESULTS/
dfnet inpaint --image IMG --mask MASK --out OUT --explain DIR   # + the fusion blocks' α and C
dfnet import-official model_places2.pth models/places2
dfnet info --model DIR
dfnet export-onnx MODEL_DIR OUT.onnx                       # needs pip install 'dfnet[onnx]'
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from dfnet.accelerate import INFERENCE_PATHS, optimize_for_inference
from dfnet.explain import PICTURES, FusionMaps, check_levels, pictures
from dfnet.images import is_image_file, open_image
from dfnet.inpaint import STRATEGIES, Inpainter
from dfnet.masks import DEFAULT_MASK_CONVENTION, MASK_CONVENTIONS
from dfnet.model import DFNet, read_model_config
from dfnet.official import CheckpointMismatchError, import_official_checkpoint
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


# Rough planning figures from bench/inference.py's "first call" and ms/image columns: what compiling
# one image size costs on a small CPU with an empty cache, and the share of a later image's time
# it saves over the path's eager fallback.
COMPILE_SECONDS = 30.0
COMPILED_SAVING = 0.25


def worth_compiling(images_left: int, seconds_per_image: float) -> bool:
    """Whether the images still to come, if they share a size, would pay back compiling it."""
    return images_left * seconds_per_image * COMPILED_SAVING > COMPILE_SECONDS


def cmd_inpaint(args: argparse.Namespace) -> int:
    model, _ = load_model(args.model, args.device)
    triples = _pairs(Path(args.image), Path(args.mask), Path(args.out))
    # One runner for the whole run, starting eager. A compiled path compiles an image size when
    # the images left could pay the compile back (`worth_compiling`, judged on the time images
    # took so far), and only once that size has come twice: a folder of photos from one camera
    # compiles once; a lone photo, a short folder or a size seen once never waits for a compile.
    runner = None
    if args.inference != "off":
        runner = optimize_for_inference(model, device=args.device, path=args.inference, compile_after=None)
        print(f"inference path: {runner.path.name} ({runner.reason})", file=sys.stderr)
    inpainter = Inpainter(model, args.device, runner=runner)
    levels: tuple[int, ...] = ()
    if args.explain:
        try:
            levels = check_levels(model, parse_levels(args.explain_levels))
        except ValueError as error:
            raise SystemExit(f"error: --explain-levels: {error}") from None
    failures = 0
    seconds: list[float] = []
    for index, (image_path, mask_path, out_path) in enumerate(
        tqdm(triples, desc="inpainting", unit="image", disable=len(triples) == 1)
    ):
        try:
            image = open_image(image_path.read_bytes())  # EXIF-rotated; L, RGB or RGBA
            mask = open_image(mask_path.read_bytes())
            start = time.perf_counter()
            if levels:
                ((result, maps),) = inpainter.explain_batch(
                    [image], [mask], levels=levels, mask_convention=args.mask_convention, strategy=args.strategy
                )
            else:
                result = inpainter.inpaint(image, mask, mask_convention=args.mask_convention, strategy=args.strategy)
            seconds.append(time.perf_counter() - start)
        except (OSError, ValueError) as error:  # one bad file must not stop a folder run
            failures += 1
            print(f"error: {image_path}: {error}", file=sys.stderr)
            continue
        if runner is not None and runner.compiled:
            runner.compile_after = 2 if worth_compiling(len(triples) - index - 1, statistics.median(seconds)) else None
        out_path.parent.mkdir(parents=True, exist_ok=True)
        result.save(out_path)
        if levels:
            write_explained(Path(args.explain), image_path.stem, maps)
    print(f"wrote {len(triples) - failures} image(s) to {args.out}" + (f"; {failures} failed" if failures else ""))
    return 1 if failures else 0


def parse_levels(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"expected levels such as 0 or 0,1,2, got {text!r}") from None


def write_explained(directory: Path, stem: str, maps: list[FusionMaps]) -> None:
    """`{stem}-fusion{level}-{picture}.png` for each block and picture (dfnet.explain.PICTURES)."""
    directory.mkdir(parents=True, exist_ok=True)
    for block in maps:
        drawn = pictures(block)
        for name in PICTURES:
            Image.fromarray(drawn[name]).save(directory / f"{stem}-fusion{block.level}-{name}.png")


def cmd_import_official(args: argparse.Namespace) -> int:
    try:
        model = import_official_checkpoint(args.checkpoint, args.out_dir)
    except CheckpointMismatchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"imported {args.checkpoint} ({model.num_parameters():,} parameters, BGR→RGB) into {args.out_dir}")
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from dfnet.onnx import export_onnx, onnxruntime_available

    if not onnxruntime_available():
        print("error: export-onnx needs onnx, onnxscript and onnxruntime: pip install 'dfnet[onnx]'", file=sys.stderr)
        return 2
    model, _ = load_model(args.model_dir)
    export_onnx(model, args.out)
    config = model.config
    prefill = "no pre-fill" if config.prefill == "none" else "the pre-fill is in the graph"
    if config.opencv_prefill:
        flag = f"cv2.INPAINT_{config.prefill.upper()}"
        prefill = f"holes pre-filled by the caller: cv2.inpaint(image, hole, {config.prefill_radius}, {flag})"
    print(
        f"wrote {args.out}: inputs image (N,3,H,W) RGB in [0,1] and mask (N,1,H,W) 1 = known, output completed "
        f"(N,3,H,W); H and W multiples of {config.size_multiple}; {prefill}"
    )
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
        default=DEFAULT_MASK_CONVENTION,
        help="hole-white: white marks the hole (default, like most inpainting tools); known-white: white = keep",
    )
    p.add_argument("--strategy", choices=STRATEGIES, default="auto", help="how images meet the network's size")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--inference",
        choices=["auto", "off", *INFERENCE_PATHS],
        default="auto",
        help="how the network runs (dfnet.accelerate): auto = the fastest path for this machine "
        "(bf16 where native, else int8: ONNX Runtime's on AVX-512 VNNI CPUs, else torch's, compiled; an image size "
        "compiles once enough images of it remain to pay the compile back, else runs eagerly), off = the plain model",
    )
    p.add_argument(
        "--explain",
        metavar="DIR",
        help="also write, per image, the fusion blocks' alpha map (a heat map of its channel mean, and per "
        "channel as RGB) and raw completion C over the photo: DIR/{stem}-fusion{level}-{alpha,alpha_rgb,raw}.png",
    )
    p.add_argument(
        "--explain-levels",
        default="0",
        help="fusion blocks for --explain, comma-separated: 0 = the finest (default), higher = coarser",
    )
    p.set_defaults(func=cmd_inpaint)

    p = sub.add_parser("import-official", help="convert the authors' released .pth into a model directory")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_import_official)

    p = sub.add_parser("export-onnx", help="write the network (fusion and composite included) as an ONNX graph")
    p.add_argument("model_dir", help="model directory, s3://bucket/prefix, an official .pth, or 'pretrained'")
    p.add_argument("out", help="the .onnx file to write")
    p.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser("info", help="print a model directory's configuration and provenance")
    p.add_argument("--model", default=PRETRAINED_NAME, help="model directory (default: the shipped model)")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
