"""Ray Serve application: DFNet inpainting over HTTP, with dynamic batching.

Start it with ``serve run serve/config.yaml`` (or ``serve deploy`` on a cluster). Every setting
comes from the ``args:`` of the application in that YAML, parsed once by :func:`app_builder`
into :class:`ServeSettings`; ``DFNET_MODEL_SOURCE``, when set in the replicas' environment,
overrides ``source``.

Endpoints: ``POST /inpaint`` (multipart or JSON/base64), ``GET /healthz``, ``GET /model``,
``GET /stats`` (observed batch sizes), ``GET /`` (the web page), ``/docs`` (OpenAPI).

No ``from __future__ import annotations`` here: FastAPI must see real annotation objects on the
methods that ``@serve.ingress`` wraps, or it takes ``request: Request`` for a query parameter.
"""

import asyncio
import base64
import binascii
import dataclasses
import io
import json
import logging
import os
import re
import tempfile
import time
import warnings
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, ImageOps, UnidentifiedImageError
from ray import serve
from ray.serve import Application
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from dfnet.inpaint import STRATEGIES, Inpainter
from dfnet.masks import MASK_CONVENTIONS, mask_from_image
from dfnet.model import CONFIG_NAME, PRESETS, WEIGHTS_NAME, DFNet, import_official_checkpoint
from dfnet.pretrained import pretrained_dir

logger = logging.getLogger("ray.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_REGISTERED_MODEL = "models:/dfnet@champion"
DEFAULT_MODEL_DIR = "models/dfnet"  # the DVC pipeline's output directory
SOURCE_ENV = "DFNET_MODEL_SOURCE"
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
CPU_FORWARD_PIXELS = 65536  # default pixels per forward pass on CPU (see ServeSettings)

SOURCE_HELP = (
    "set `source` in the application args of serve/config.yaml (or the DFNET_MODEL_SOURCE "
    "environment variable) to a model directory, an s3://bucket/prefix holding config.json and "
    "model.safetensors, a registered model URI such as models:/dfnet@champion, or an official "
    ".pth checkpoint; or train one with `dvc repro`"
)


# --------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """The application's `args:` from serve/config.yaml (defaults here when a key is absent)."""

    source: str = "auto"  # model dir | s3://... | models:/name@alias | *.pth | auto
    device: str = "auto"  # auto = cuda when the replica sees a GPU, else cpu
    tracking_uri: str | None = None  # MLflow; None = $MLFLOW_TRACKING_URI or ./mlflow.db
    max_pixels: int = 4096 * 4096  # larger images (by their header) get 413
    max_upload_bytes: int = 32 * 1024 * 1024  # larger request bodies get 413
    batching: bool = True
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    work_size: int | None = None  # Inpainter work size; None = dfnet.inpaint.DEFAULT_WORK_SIZE
    # Pixels per forward pass (batch × padded H × W): a request batch is split into forward
    # passes of at most this many pixels. On a CPU a big batch of big images runs slower per
    # image than small passes (activations fall out of cache); None = 65536 on CPU (e.g. 4 ×
    # 128² or 1 × 256², measured best for the small preset), unlimited on GPU.
    forward_pixels: int | None = None
    optimize: bool = False  # dfnet.accelerate: fold BatchNorm + channels_last
    dtype: str | None = None  # with optimize: "bfloat16"/"float16" autocast
    compile: bool = False  # with optimize: torch.compile (compiled at start-up by warmup)
    warmup: bool = True  # one inference at start-up so the first request is not slow
    torch_threads: int | None = None  # None = what Ray gives the replica (its num_cpus)
    access_log: bool = True  # Serve's per-request log line (costs a little per request)
    # Replica placement and scaling.
    num_replicas: int = 1  # ignored when autoscaling_config is set
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: int = 32  # must be ≥ max_batch_size or batches never fill
    autoscaling_config: dict[str, Any] | None = None

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "ServeSettings":
        """Validate the YAML args: unknown keys and out-of-range values are errors."""
        args = dict(args or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(fields))
        if unknown:
            raise ValueError(f"unknown serve args {unknown}; known: {sorted(fields)}")
        settings = cls(**args)
        positive = ("max_pixels", "max_upload_bytes", "max_batch_size", "max_ongoing_requests")
        for name in positive + ("forward_pixels",) * (settings.forward_pixels is not None):
            value = getattr(settings, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"serve arg {name} must be a positive integer, got {value!r}")
        if settings.batch_wait_timeout_s < 0:
            raise ValueError("serve arg batch_wait_timeout_s must be >= 0")
        if settings.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(
                f"serve arg dtype must be float32, bfloat16 or float16, got {settings.dtype!r}"
            )
        if settings.batching and settings.max_ongoing_requests < settings.max_batch_size:
            raise ValueError("max_ongoing_requests must be >= max_batch_size for batches to fill")
        return settings

    def deployment_options(self) -> dict[str, Any]:
        """Options for `InpaintDeployment.options(...)`: resources, replicas, concurrency."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "logging_config": {"enable_access_log": self.access_log},
        }
        if self.autoscaling_config:
            options["autoscaling_config"] = dict(self.autoscaling_config)
        else:
            options["num_replicas"] = self.num_replicas
        return options


# --------------------------------------------------------------------------- model sources
def resolve_device(device: str) -> str:
    """ "auto" → "cuda" when this process sees a GPU (a replica with num_gpus > 0), else "cpu"."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _default_tracking_uri() -> str | None:
    """$MLFLOW_TRACKING_URI, else ./mlflow.db when that file exists (never create one)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    db = Path("mlflow.db")
    return f"sqlite:///{db.resolve()}" if db.is_file() else None


def _registry_has(uri: str, tracking_uri: str) -> bool:
    """Whether a `models:/name@alias` URI resolves in the registry (any failure = no)."""
    match = re.fullmatch(r"models:/([^/@]+)@([^/]+)", uri)
    if not match:
        return False
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        client.get_model_version_by_alias(match.group(1), match.group(2))
        return True
    except Exception as exc:  # no such model/alias, no registry tables, unreachable server ...
        logger.info("registry %s has no %s: %s", tracking_uri, uri, exc)
        return False


def resolve_source(source: str, tracking_uri: str | None = None) -> str:
    """Turn `auto` into a concrete source: the registry's champion, else models/dfnet, else the
    model shipped with the package (so a fresh install serves out of the box)."""
    if source != "auto":
        return source
    tracking_uri = tracking_uri or _default_tracking_uri()
    if tracking_uri and _registry_has(DEFAULT_REGISTERED_MODEL, tracking_uri):
        return DEFAULT_REGISTERED_MODEL
    if (Path(DEFAULT_MODEL_DIR) / CONFIG_NAME).is_file():
        return str(Path(DEFAULT_MODEL_DIR).resolve())
    if (pretrained_dir() / CONFIG_NAME).is_file():
        return str(pretrained_dir())
    raise FileNotFoundError(
        f"source 'auto' found no model: no {DEFAULT_REGISTERED_MODEL} in the MLflow registry "
        f"({tracking_uri or 'none configured'}), no {DEFAULT_MODEL_DIR}/ under {Path.cwd()} and no "
        f"shipped model in {pretrained_dir()}; " + SOURCE_HELP
    )


def _s3_filesystem() -> Any:
    import s3fs

    # S3-compatible stores (MinIO, moto, ...) are reached through AWS_ENDPOINT_URL.
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": endpoint} if endpoint else {}, skip_instance_cache=True
    )


def _download_s3(uri: str, dest: Path) -> Path:
    """Copy a model directory (or one .pth file) from S3 into `dest`; returns the local path."""
    fs = _s3_filesystem()
    key = uri[len("s3://") :].rstrip("/")
    if key.endswith(".pth"):
        target = dest / Path(key).name
        fs.get(key, str(target))
        return target
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not fs.exists(f"{key}/{name}"):
            raise FileNotFoundError(f"{uri}/{name} not found: not a DFNet model directory")
        fs.get(f"{key}/{name}", str(dest / name))
    return dest


def _preset_name(model: DFNet) -> str:
    """The preset the architecture is, e.g. "small", or "small + ns pre-fill"; else "custom"."""
    plain = dataclasses.replace(model.config, prefill="none")
    for name, config in PRESETS.items():
        if config == plain:
            return name if model.config.prefill == "none" else f"{name} + {model.config.prefill} pre-fill"
    return "custom"


def load_inpainter(
    source: str,
    device: str | torch.device = "cpu",
    *,
    tracking_uri: str | None = None,
    work_size: int | None = None,
    max_batch: int = 8,
    optimize: bool = False,
    dtype: str | None = None,
    compile: bool = False,
) -> tuple[Inpainter, dict[str, Any]]:
    """Load an `Inpainter` from any supported model source and describe what was loaded.

    source: a local model directory; ``s3://bucket/prefix`` (config.json + model.safetensors,
    endpoint from AWS_ENDPOINT_URL); ``models:/name@alias`` or ``models:/name/version`` (MLflow
    registry, via tracking.registry); a ``.pth`` official checkpoint (local or s3://),
    converted on the fly; or ``auto`` (see :func:`resolve_source`).
    """
    device = torch.device(resolve_device(str(device)))
    resolved = resolve_source(source, tracking_uri)
    info: dict[str, Any] = {"name": "dfnet", "source": resolved, "requested_source": source}
    with tempfile.TemporaryDirectory(prefix="dfnet-serve-") as tmp:
        location: str | Path = resolved
        if resolved.startswith("models:/"):
            # Imported lazily: only this source needs MLflow and the pipelines package.
            from tracking.registry import download_registered_model

            location, registry_info = download_registered_model(resolved, tracking_uri)
            info["kind"] = "mlflow"
            info.update({k: registry_info.get(k) for k in ("version", "alias", "run_id")})
            info["registered_name"] = registry_info.get("name")
        elif resolved.startswith("s3://"):
            location = _download_s3(resolved, Path(tmp))
            info["kind"] = "s3"
        else:
            location = Path(resolved).expanduser()
            if not location.exists():
                raise FileNotFoundError(f"model source {resolved!r} does not exist; " + SOURCE_HELP)
            info["kind"] = "directory"
        location = Path(location)
        if location.suffix == ".pth":
            # Official checkpoints are read with weights_only=True and converted to a model dir.
            converted = Path(tmp) / "converted"
            import_official_checkpoint(location, converted)
            location = converted
            info["kind"] = "official-checkpoint"
        model = DFNet.from_pretrained(location, map_location=device)

    runner = None
    if optimize:
        from dfnet.accelerate import optimize_for_inference

        torch_dtype = None if dtype in (None, "float32") else getattr(torch, dtype)
        runner = optimize_for_inference(model, device=device, dtype=torch_dtype, compile=compile)
    inpainter = Inpainter(model, device, work_size=work_size, max_batch=max_batch, runner=runner)
    info.update(
        preset=_preset_name(model),
        parameters=model.num_parameters(),
        config=model.config.to_dict(),
        provenance=getattr(model, "provenance", {}),
        device=str(device),
        dtype=dtype or "float32",
        optimized=optimize,
        compiled=bool(getattr(runner, "compiled", False)),
        work_size=inpainter.work_size,
        size_multiple=inpainter.multiple,
    )
    return inpainter, info


# --------------------------------------------------------------------------- request parsing
class ApiError(Exception):
    """A client error answered as JSON ``{"detail": message}`` with `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclasses.dataclass
class _Fields:
    image: bytes
    mask: bytes
    mask_convention: str
    strategy: str


@dataclasses.dataclass
class _Job:
    """One decoded request, ready for the model: mask already reduced to the hole."""

    image: Image.Image
    hole: np.ndarray  # bool H×W, True = fill
    strategy: str


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over `limit` bytes before reading it all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():  # chunked uploads carry no length: count as they come
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ApiError(422, f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _b64(name: str, value: Any) -> bytes:
    if not isinstance(value, str):
        raise ApiError(422, f"field {name!r} must be a base64 string")
    # Accept data URLs ("data:image/png;base64,...") as browsers and several servers send them.
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(re.sub(r"\s+", "", value), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(422, f"field {name!r} is not valid base64: {exc}") from None


async def _read_fields(request: Request, limit: int) -> _Fields:
    """Parse either request style into raw image/mask bytes and the two options."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in ("multipart/form-data", "application/json"):
        raise ApiError(
            415,
            f"unsupported content type {media or 'none'!r}: send multipart/form-data with "
            "files 'image' and 'mask', or application/json with base64 fields",
        )
    body = await _read_body(request, limit)
    if media == "application/json":
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
            raise ApiError(400, f"malformed JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise ApiError(422, "the JSON body must be an object with 'image' and 'mask'")
        get = payload.get
        files = {}
        for name in ("image", "mask"):
            if get(name) is None:
                raise ApiError(422, f"missing field {name!r}")
            files[name] = _b64(name, get(name))
    else:
        sent = False

        async def replay() -> dict[str, Any]:
            # The body is already in memory (its size checked); hand it to Starlette's parser.
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(
                max_files=4, max_fields=16, max_part_size=limit
            )
        except StarletteHTTPException as exc:
            raise ApiError(400, f"malformed multipart body: {exc.detail}") from None
        except Exception as exc:  # python-multipart raises several types on garbage
            raise ApiError(400, f"malformed multipart body: {exc}") from None
        try:
            files = {}
            for name in ("image", "mask"):
                part = form.get(name)
                if part is None:
                    raise ApiError(422, f"missing field {name!r}")
                if not isinstance(part, UploadFile):
                    raise ApiError(422, f"field {name!r} must be a file upload")
                files[name] = await part.read()
            get = form.get
        finally:
            await form.close()
    convention = get("mask_convention") or "hole-white"
    strategy = get("strategy") or "auto"
    return _Fields(
        image=files["image"],
        mask=files["mask"],
        mask_convention=_check_choice("mask_convention", convention, MASK_CONVENTIONS),
        strategy=_check_choice("strategy", strategy, STRATEGIES),
    )


def decode_image(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Decode untrusted bytes as a PNG/JPEG/WebP image, EXIF-rotated as browsers show it.

    Raises ApiError: 413 when the header announces more than `max_pixels` pixels (checked
    before any pixel is decoded, which defuses decompression bombs), 422 when the data is not
    such an image or is truncated/corrupt.
    """
    if not data:
        raise ApiError(422, f"{field}: empty file")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ApiError(413, f"{field}: {exc}") from None
    except UnidentifiedImageError:
        raise ApiError(422, f"{field}: not a PNG, JPEG or WebP image") from None
    except Exception as exc:  # Pillow raises many types (SyntaxError, struct.error, ...) on junk
        raise ApiError(422, f"{field}: unreadable image ({type(exc).__name__}: {exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ApiError(
            413,
            f"{field}: {width}×{height} = {width * height} pixels exceeds the limit of "
            f"{max_pixels}",
        )
    if width == 0 or height == 0:
        raise ApiError(422, f"{field}: image has no pixels")
    try:
        image.load()  # decode now: truncated or corrupt data fails here, not later in the model
        ImageOps.exif_transpose(image, in_place=True)  # no copy when there is nothing to turn
        if image.mode not in ("RGB", "RGBA", "L"):
            has_alpha = "A" in image.mode or "transparency" in image.info
            image = image.convert("RGBA" if has_alpha else "RGB")
    except Image.DecompressionBombError as exc:
        raise ApiError(413, f"{field}: {exc}") from None
    except Exception as exc:
        raise ApiError(
            422, f"{field}: truncated or corrupt image ({type(exc).__name__}: {exc})"
        ) from None
    return image


def decode_job(fields: _Fields, max_pixels: int) -> _Job:
    """Decode and validate one request. A mask whose size differs from the image is rejected
    (422): resizing it would silently move the hole."""
    image = decode_image(fields.image, "image", max_pixels)
    mask = decode_image(fields.mask, "mask", max_pixels)
    if mask.size != image.size:
        raise ApiError(
            422,
            f"mask size {mask.size[0]}×{mask.size[1]} differs from image size "
            f"{image.size[0]}×{image.size[1]} (after EXIF rotation); send a mask of the same size",
        )
    # decode_image leaves only L, RGB and RGBA, all of which mask_from_image reads.
    known = mask_from_image(np.asarray(mask), fields.mask_convention)
    return _Job(image=image, hole=known == 0, strategy=fields.strategy)


def forward_area(inpainter: Inpainter, shape: tuple[int, int], strategy: str) -> int:
    """Pixels of one image's network input: the whole padded image for small photos, windows
    of at most work_size² otherwise (an estimate of `Inpainter`'s plan, used to size passes)."""
    height, width = shape
    m, work = inpainter.multiple, inpainter.work_size
    if strategy == "pad" or (strategy == "auto" and max(height, width) <= 2 * work):
        return -(-height // m) * m * (-(-width // m) * m)
    return (-(-work // m) * m) ** 2


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes. Encoding time counts against throughput: zlib level 1 with the run-length
    strategy measured ~3× faster than the default level 6 for about the same size on photos."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
    return buffer.getvalue()


# --------------------------------------------------------------------------- the deployment
API_DESCRIPTION = """
Fill the holes of a photo with DFNet (Deep Fusion Network for Image Completion).

`POST /inpaint` takes an image and a mask, either as **multipart/form-data** files `image` and
`mask`, or as **application/json** `{"image": "<base64>", "mask": "<base64>"}` (data URLs are
accepted). Images and masks may be PNG, JPEG or WebP; the image is EXIF-rotated as browsers
show it. Optional fields: `mask_convention` (`hole-white`, the default: white = fill;
`known-white`: white = keep) and `strategy` for large images (`auto`, `pad`, `resize`, `crops`).
The answer is an `image/png` of the input's size and mode in which every pixel outside the hole
is bit-exact; an empty mask returns the input unchanged.

Errors are JSON `{"detail": "message"}`: 400 malformed body (multipart or JSON); 413 body over
the upload limit, or an image over the pixel limit (checked from the header, so decompression
bombs are refused before decoding); 415 request that is neither multipart nor JSON; 422 missing
field, unknown option, data that is not a PNG/JPEG/WebP image, truncated image, or a **mask
whose size differs from the image (rejected, never resized)**.
"""

api = FastAPI(title="DFNet inpainting", version="0.1.0", description=API_DESCRIPTION)

_ERROR_SCHEMA = {
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"detail": {"type": "string"}},
                "required": ["detail"],
            }
        }
    }
}
_OPTION_PROPERTIES = {
    "mask_convention": {"type": "string", "enum": list(MASK_CONVENTIONS), "default": "hole-white"},
    "strategy": {"type": "string", "enum": list(STRATEGIES), "default": "auto"},
}
_INPAINT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "mask"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "mask": {"type": "string", "format": "binary"},
                        **_OPTION_PROPERTIES,
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["image", "mask"],
                    "properties": {
                        "image": {"type": "string", "description": "base64 (or data URL)"},
                        "mask": {"type": "string", "description": "base64 (or data URL)"},
                        **_OPTION_PROPERTIES,
                    },
                }
            },
        },
    }
}
_INPAINT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
    **{
        code: {"description": text, **_ERROR_SCHEMA}
        for code, text in [
            (400, "Malformed body"),
            (413, "Upload or image too large"),
            (415, "Unsupported content type"),
            (422, "Invalid field or image"),
        ]
    },
}


@api.exception_handler(ApiError)
async def _api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"detail": exc.message}, status_code=exc.status)


@api.exception_handler(Exception)
async def _server_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # Same JSON shape as client errors, so the web page can show the message.
    logger.exception("unhandled error on %s", request.url.path)
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)


class _Stats:
    """What this replica has seen; `/stats` reports it so a benchmark can read batch sizes."""

    def __init__(self) -> None:
        self.requests = 0
        self.completed = 0
        self.rejected: Counter[int] = Counter()
        self.batch_sizes: Counter[int] = Counter()
        self.model_seconds = 0.0

    def as_dict(self) -> dict[str, Any]:
        batches = sum(self.batch_sizes.values())
        return {
            "requests": self.requests,
            "completed": self.completed,
            "rejected": {str(k): v for k, v in sorted(self.rejected.items())},
            "batches": batches,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "mean_batch_size": (sum(k * v for k, v in self.batch_sizes.items()) / batches)
            if batches
            else None,
            "model_seconds": round(self.model_seconds, 4),
            "pid": os.getpid(),
        }


@serve.deployment
@serve.ingress(api)
class InpaintDeployment:
    """One replica: a loaded `Inpainter`, a single model thread, and a `@serve.batch` queue."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = ServeSettings.from_args(settings)
        s = self.settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        # Belt and braces with the header check in decode_image: Pillow itself refuses images
        # far above the limit. Its warning zone is covered by our stricter explicit check.
        Image.MAX_IMAGE_PIXELS = s.max_pixels
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        source = os.environ.get(SOURCE_ENV) or s.source
        self.inpainter, self.info = load_inpainter(
            source,
            s.device,
            tracking_uri=s.tracking_uri,
            work_size=s.work_size,
            max_batch=s.max_batch_size,
            optimize=s.optimize,
            dtype=s.dtype,
            compile=s.compile,
        )
        # One thread owns the model: batches run one after another at full intra-op
        # parallelism instead of fighting over the cores, and the event loop stays free.
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dfnet-model")
        self._infer_batch.set_max_batch_size(s.max_batch_size)
        self._infer_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        self.stats = _Stats()
        self.forward_pixels = s.forward_pixels or (
            CPU_FORWARD_PIXELS if self.inpainter.device.type == "cpu" else None
        )
        self.info["forward_pixels"] = self.forward_pixels
        self._page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
        if s.warmup:
            side = self.inpainter.work_size
            hole = np.zeros((side, side), dtype=bool)
            hole[side // 4 : side // 2, side // 4 : side // 2] = True
            self._run_jobs([_Job(Image.new("RGB", (side, side), (127, 127, 127)), hole, "auto")])
        logger.info(
            "DFNet replica ready: %s", {k: self.info[k] for k in ("source", "preset", "device")}
        )

    # ------------------------------------------------------------------ model execution
    def _run_jobs(self, jobs: list[_Job]) -> list[Image.Image | Exception]:
        """Run on the model thread. One `inpaint_batch` per strategy (a call takes one); within
        it, windows of equal padded size share forward passes."""
        start = time.perf_counter()
        results: list[Image.Image | Exception] = [ValueError("not run")] * len(jobs)
        by_strategy: dict[str, list[int]] = {}
        for index, job in enumerate(jobs):
            by_strategy.setdefault(job.strategy, []).append(index)
        for strategy, indices in by_strategy.items():
            if self.forward_pixels:
                # Only this thread uses the Inpainter, so adjusting its pass size is safe.
                area = max(
                    forward_area(self.inpainter, jobs[i].hole.shape, strategy) for i in indices
                )
                self.inpainter.max_batch = max(
                    1, min(self.settings.max_batch_size, self.forward_pixels // area)
                )
            images = [jobs[i].image for i in indices]
            masks = [jobs[i].hole.astype(np.uint8) * 255 for i in indices]  # normalised: hole-white
            try:
                outputs = self.inpainter.inpaint_batch(
                    images, masks, mask_convention="hole-white", strategy=strategy
                )
            except Exception:
                # Isolate the culprit so one bad request cannot fail its batch-mates.
                outputs = []
                for image, mask in zip(images, masks, strict=True):
                    try:
                        outputs.append(self.inpainter.inpaint(image, mask, strategy=strategy))
                    except Exception as exc:
                        outputs.append(exc)
            for i, out in zip(indices, outputs, strict=True):
                results[i] = out
        self.stats.model_seconds += time.perf_counter() - start
        return results

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _infer_batch(self, jobs: list[_Job]) -> list[tuple[Image.Image | Exception, int]]:
        self.stats.batch_sizes[len(jobs)] += 1
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._model_thread, self._run_jobs, jobs)
        return [(r, len(jobs)) for r in results]

    async def _infer_single(self, job: _Job) -> tuple[Image.Image | Exception, int]:
        self.stats.batch_sizes[1] += 1
        loop = asyncio.get_running_loop()
        (result,) = await loop.run_in_executor(self._model_thread, self._run_jobs, [job])
        return result, 1

    # ------------------------------------------------------------------ routes
    @api.post(
        "/inpaint",
        response_class=Response,
        responses=_INPAINT_RESPONSES,
        openapi_extra=_INPAINT_OPENAPI,
        summary="Fill the hole of an image",
    )
    async def inpaint(self, request: Request) -> Response:
        """Multipart (`image`, `mask` files) or JSON (base64 `image`, `mask`) → image/png."""
        self.stats.requests += 1
        try:
            fields = await _read_fields(request, self.settings.max_upload_bytes)
            job = await asyncio.to_thread(decode_job, fields, self.settings.max_pixels)
            if not job.hole.any():
                result, batch_size = job.image, 0  # nothing to fill: the input, untouched
            elif self.settings.batching:
                result, batch_size = await self._infer_batch(job)
            else:
                result, batch_size = await self._infer_single(job)
            if isinstance(result, ValueError):
                raise ApiError(422, str(result))
            if isinstance(result, Exception):
                raise result
            png = await asyncio.to_thread(encode_png, result)
        except ApiError as exc:
            self.stats.rejected[exc.status] += 1
            raise
        self.stats.completed += 1
        return Response(
            png,
            media_type="image/png",
            headers={"X-Batch-Size": str(batch_size), "X-Hole-Pixels": str(int(job.hole.sum()))},
        )

    @api.get("/healthz", summary="Liveness")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/model", summary="What is loaded")
    async def model(self) -> dict[str, Any]:
        s = self.settings
        return {
            **self.info,
            "batching": {
                "enabled": s.batching,
                "max_batch_size": s.max_batch_size,
                "batch_wait_timeout_s": s.batch_wait_timeout_s,
            },
            "limits": {"max_pixels": s.max_pixels, "max_upload_bytes": s.max_upload_bytes},
            "mask_conventions": list(MASK_CONVENTIONS),
            "strategies": list(STRATEGIES),
        }

    @api.get("/stats", summary="Requests and observed batch sizes of the replica that answers")
    async def get_stats(self) -> dict[str, Any]:
        return self.stats.as_dict()

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self._page)


def build_app(settings: ServeSettings) -> Application:
    """The bound application for `serve.run` (tests, benchmarks)."""
    return InpaintDeployment.options(**settings.deployment_options()).bind(
        dataclasses.asdict(settings)
    )


def app_builder(args: dict[str, Any]) -> Application:
    """Serve application builder (``import_path: serve.app:app_builder``); args from the YAML."""
    return build_app(ServeSettings.from_args(args))
