"""Request and settings models of the Serve application (Pydantic, so FastAPI and Serve
validate them and the OpenAPI page documents them)."""

import base64
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, NonNegativeFloat, PositiveInt

from dfnet.accelerate import INFERENCE_PATHS
from dfnet.inpaint import STRATEGIES
from dfnet.masks import MASK_CONVENTIONS

# The library's own lists as types: FastAPI and Pydantic then validate and document them.
MaskConvention = Literal[MASK_CONVENTIONS]  # type: ignore[valid-type]
StrategyName = Literal[STRATEGIES]  # type: ignore[valid-type]
InferenceName = Literal[("auto", *INFERENCE_PATHS, "off")]  # type: ignore[valid-type]


class ServeSettings(BaseModel):
    """The application's ``args:`` in serve/config.yaml; an unknown key is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = "auto"  # model dir | s3://... | models:/name@alias | *.pth | auto
    tracking_uri: str | None = None  # MLflow, for models:/ sources; None = $MLFLOW_TRACKING_URI
    device: str = "auto"  # auto = cuda when the replica sees a GPU, else cpu
    # dfnet.accelerate path: auto (chosen from the CPU's flags / CUDA), a named path, or off.
    inference: InferenceName = "auto"
    # Square sides the inference path is compiled at during start-up, at batch 1 and 2 (see
    # InpaintDeployment): requests at these sizes never wait for a compile, and only these run
    # compiled (others run eagerly); [] = none.
    warmup_sizes: list[PositiveInt] = [128, 256]
    work_size: PositiveInt | None = None  # Inpainter's work size; None = its default
    # Pixels per forward pass (batch × padded H × W). On a CPU a big batch of big images runs
    # slower per image than small passes (activations fall out of cache); None = 65536 on CPU
    # (4 × 128² or 1 × 256²), unlimited on GPU.
    forward_pixels: PositiveInt | None = None
    batching: bool = True
    max_batch_size: PositiveInt = 8
    batch_wait_timeout_s: NonNegativeFloat = 0.02
    max_upload_bytes: PositiveInt = 32 * 1024 * 1024  # larger request bodies get 413
    max_pixels: PositiveInt = 4096 * 4096  # larger images (by their header) get 413


def _base64(value: Any) -> Any:
    """Plain base64 or a data URL ("data:image/png;base64,..."), as browsers produce them."""
    if not isinstance(value, str):
        return value  # Pydantic then refuses it as "not bytes"
    if value.startswith("data:"):
        value = value.partition(",")[2]
    return base64.b64decode("".join(value.split()), validate=True)


class InpaintJSON(BaseModel):
    """The JSON form of a request: the two files base64-encoded."""

    image: Annotated[bytes, BeforeValidator(_base64)]
    mask: Annotated[bytes, BeforeValidator(_base64)]
    mask_convention: MaskConvention = "hole-white"
    strategy: StrategyName = "auto"
