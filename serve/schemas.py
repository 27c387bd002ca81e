"""Request and settings models of the Serve application (Pydantic, so FastAPI and Serve
validate them and the OpenAPI page documents them)."""

import base64
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveInt

from dfnet.accelerate import INFERENCE_PATHS
from dfnet.inpaint import STRATEGIES
from dfnet.masks import DEFAULT_MASK_CONVENTION, MASK_CONVENTIONS

# The library's own lists as types: FastAPI and Pydantic then validate and document them.
MaskConvention = Literal[MASK_CONVENTIONS]  # type: ignore[valid-type]
StrategyName = Literal[STRATEGIES]  # type: ignore[valid-type]
InferenceName = Literal[("auto", *INFERENCE_PATHS, "off")]  # type: ignore[valid-type]


CONFIG = Path(__file__).resolve().parent / "config.yaml"


class ServeSettings(BaseModel):
    """The application's ``args:`` in serve/config.yaml, the one home of their values: no
    defaults here (`configured_settings` reads them); an unknown or missing key is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str  # model dir | s3://... | models:/name@alias | *.pth | auto
    tracking_uri: str | None  # MLflow, for models:/ sources; None = $MLFLOW_TRACKING_URI
    device: str  # auto = cuda when the replica sees a GPU, else cpu
    # dfnet.accelerate path: auto (chosen from the CPU's flags / CUDA), a named path, or off.
    inference: InferenceName
    # Square sides compiled at start-up, at batch 1 and 2: requests at these sizes never wait
    # for a compile, and only these run compiled (others run eagerly); [] = none.
    warmup_sizes: list[PositiveInt]
    work_size: PositiveInt | None  # Inpainter's work size; None = its default
    # Pixels per forward pass (batch × padded H × W): on a CPU big batches of big images run
    # slower per image (activations fall out of cache). None = CPU_FORWARD_PIXELS on CPU,
    # unlimited on GPU.
    forward_pixels: PositiveInt | None
    batching: bool
    max_batch_size: PositiveInt
    batch_wait_timeout_s: NonNegativeFloat
    max_upload_bytes: PositiveInt  # larger request bodies get 413
    max_pixels: PositiveInt  # larger images (by their header) get 413


def _configured_application() -> dict[str, Any]:
    (application,) = yaml.safe_load(CONFIG.read_text())["applications"]
    return application


def configured_settings(**overrides: Any) -> ServeSettings:
    """serve/config.yaml's application args, with `overrides` (for tests, benches and scripts)."""
    return ServeSettings.model_validate({**_configured_application()["args"], **overrides})


def configured_deployment_options() -> dict[str, Any]:
    """serve/config.yaml's options of the deployment (max_ongoing_requests, ...), less its name."""
    (deployment,) = _configured_application()["deployments"]
    return {k: v for k, v in deployment.items() if k != "name"}


def _base64(value: Any) -> Any:
    """Plain base64 or a data URL ("data:image/png;base64,..."), as browsers produce them."""
    if not isinstance(value, str):
        return value  # Pydantic then refuses it as "not bytes"
    if value.startswith("data:"):
        value = value.partition(",")[2]
    return base64.b64decode("".join(value.split()), validate=True)


Base64File = Annotated[bytes, BeforeValidator(_base64)]


def parse_levels(text: str) -> tuple[int, ...]:
    """Fusion levels from a form field: "" → none, "0" or "0,2" → those, sorted, once each."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not all(part.isascii() and part.isdigit() for part in parts):
        raise ValueError(f"expected fusion levels such as 0 or 0,1 (0 = the finest block), got {text!r}")
    return tuple(sorted({int(part) for part in parts}))


class InpaintJSON(BaseModel):
    """The JSON form of a request: the two files base64-encoded."""

    image: Base64File
    mask: Base64File
    mask_convention: MaskConvention = DEFAULT_MASK_CONVENTION
    strategy: StrategyName = "auto"
    # Fusion blocks to explain (0 = the finest); non-empty → the answer is `Explained` JSON.
    explain: list[NonNegativeInt] = Field(default=[], max_length=16)


class IOPaintRequest(BaseModel):
    """IOPaint's (lama-cleaner's) `/api/v1/inpaint` body. Its other fields (model settings,
    prompts, HD strategy) are accepted and ignored: DFNet has no such knobs."""

    model_config = ConfigDict(extra="ignore")

    image: Base64File = Field(description="base64, or a data URL: PNG, JPEG or WebP")
    mask: Base64File = Field(description="base64, or a data URL: same size as the image, white = fill")


class FusionPictures(BaseModel):
    """One fusion block's pictures over the whole photo, as PNG data URLs."""

    level: int = Field(description="0 = the finest block (full resolution)")
    scale: float = Field(description="the block's resolution relative to the network input (1/2**level)")
    alpha: str = Field(description="heat map of α averaged over its channels (inferno: dark = input kept)")
    alpha_rgb: str = Field(description="α per colour channel, as that channel")
    raw: str = Field(description="the raw completion C, before blending with the input")


class Explained(BaseModel):
    """The answer of an explained request: the completed image, exactly the PNG the plain
    request answers, and for each fusion block asked α and C. Where the network did not run
    (outside the windows around the holes of a large photo) α is 0 and C the input."""

    image: str = Field(description="the completed image, a PNG data URL")
    width: int
    height: int
    alpha_channels: int = Field(description="1 (one α per pixel) or 3 (one per colour channel)")
    fusion: list[FusionPictures]
