"""The Ray Serve endpoint, run for real: a local Ray, Serve on a free loopback port, httpx.

Two applications share one Serve instance: `/` with dynamic batching (through dfnet.accelerate's
eager runner) and `/nobatch` without (the plain model). The model is a randomly initialised
`small` preset saved to a temporary model directory, so the tests check plumbing (sizes, modes,
bit-exact known pixels, batching, errors), not quality.
"""

import base64
import io
import itertools
import json
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from dfnet.images import decode_image
from dfnet.model import DFNet, build_model
from dfnet.pretrained import pretrained_dir
from serve.app import BATCHES_IN_FLIGHT, InpaintDeployment, load_inpainter, resolve_source
from serve.ray_env import read_ray_env
from serve.schemas import ServeSettings, configured_deployment_options, configured_settings

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
MAX_PIXELS = 512 * 512
MAX_UPLOAD = 1_000_000


# --------------------------------------------------------------------------- helpers
def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def random_image(height: int, width: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode)


def rect_mask(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Bool hole (True = fill) with rows box[0]:box[2], columns box[1]:box[3]."""
    hole = np.zeros((height, width), dtype=bool)
    hole[box[0] : box[2], box[1] : box[3]] = True
    return hole


def mask_png(hole: np.ndarray, white_is_hole: bool = True) -> bytes:
    white = hole if white_is_hole else ~hole
    return encode(Image.fromarray(white.astype(np.uint8) * 255, "L"))


def multipart(image: bytes, mask: bytes, **fields: str) -> dict:
    return {
        "files": {
            "image": ("image.png", image, "image/png"),
            "mask": ("mask.png", mask, "image/png"),
        },
        "data": fields,
    }


def decode_png(response: httpx.Response) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG"
    image.load()
    return image


def png_bomb(side: int = 20_000) -> bytes:
    """A valid 1-bit PNG of side×side black pixels: ~50 MB when decoded, ~50 KB on the wire."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # depth 1, greyscale
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed pixels
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row * 500) for _ in range(side // 500)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


@dataclass
class Server:
    url: str  # the batched application
    nobatch_url: str  # the same model without batching
    model_dir: Path


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return build_model("small").save_pretrained(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def server(ray_local, model_dir: Path, free_loopback_port):
    """Serve started once for this file; shut down (Ray itself stays for other files)."""
    from ray import serve

    serve.shutdown()  # a Serve left by another file would keep its own port and options
    port = free_loopback_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = dict(
        source=str(model_dir),
        max_pixels=MAX_PIXELS,
        max_upload_bytes=MAX_UPLOAD,
        max_batch_size=4,
        batch_wait_timeout_s=0.1,
        warmup_sizes=[],
    )
    # num_cpus=0: do not compete with other test files for the session's 2 CPUs.
    deployment = InpaintDeployment.options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=16)
    serve.run(deployment.bind(configured_settings(**common, inference="eager")), name="batched", route_prefix="/")
    unbatched = configured_settings(**common, inference="off", batching=False)
    serve.run(deployment.bind(unbatched), name="unbatched", route_prefix="/nobatch")
    base = f"http://127.0.0.1:{port}"
    yield Server(url=base, nobatch_url=base + "/nobatch", model_dir=model_dir)
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server: Server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def assert_still_serving(client: httpx.Client) -> None:
    """The very next valid request after a rejected one succeeds."""
    image = random_image(64, 64, seed=7)
    hole = rect_mask(64, 64, (10, 10, 30, 30))
    response = client.post("/inpaint", **multipart(encode(image), mask_png(hole)))
    result = np.asarray(decode_png(response))
    np.testing.assert_array_equal(result[~hole], np.asarray(image)[~hole])


# --------------------------------------------------------------------------- basic routes
def test_health_model_page_and_docs(server: Server, client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/model").json()
    assert info["source"] == str(server.model_dir)
    assert info["kind"] == "directory"
    assert info["preset"] == "small"
    assert info["parameters"] == build_model("small").num_parameters()
    assert info["batching"]["enabled"] is True and info["batching"]["max_batch_size"] == 4
    assert info["limits"] == {"max_pixels": MAX_PIXELS, "max_upload_bytes": MAX_UPLOAD}
    assert info["device"] == "cpu" and info["forward_pixels"] == 65536  # the CPU default
    assert info["inference"] == "eager"
    assert info["ray_env"] == read_ray_env()  # the replica's Ray was started with them (conftest)
    unbatched = httpx.get(server.nobatch_url + "/model").json()
    assert unbatched["batching"]["enabled"] is False and unbatched["inference"] == "off"

    page = client.get("/")
    assert page.headers["content-type"].startswith("text/html")
    for element in ('id="view"', 'id="overlay"', 'id="inpaint"', 'id="view-alpha"', 'src="static/editor.js"'):
        assert element in page.text
    # The page's own modules, served by the app (no build step, nothing from elsewhere).
    script = client.get("/static/editor.js")
    assert script.headers["content-type"].startswith("text/javascript") and 'fetch("inpaint"' in script.text
    style = client.get("/static/editor.css")
    assert style.headers["content-type"].startswith("text/css")
    assert client.get("/static/../app.py").status_code == 404 and client.get("/static/nope.js").status_code == 404
    for text in (page.text, script.text, style.text):  # works offline: nothing from the web
        assert "http://" not in text and "https://" not in text
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    (form,) = spec["paths"]["/inpaint"]["post"]["requestBody"]["content"].values()
    schemas = spec["components"]["schemas"]
    assert schemas[form["schema"]["$ref"].rpartition("/")[2]]["required"] == ["image", "mask"]
    assert "application/json" in spec["paths"]["/inpaint/base64"]["post"]["requestBody"]["content"]
    iopaint = spec["paths"]["/api/v1/inpaint"]["post"]
    assert (
        "application/json" in iopaint["requestBody"]["content"]
        and "image/png" in iopaint["responses"]["200"]["content"]
    )
    assert {"image", "fusion"} <= set(schemas["Explained"]["properties"])
    assert "explain" in schemas[form["schema"]["$ref"].rpartition("/")[2]]["properties"]


# --------------------------------------------------------------------------- valid requests
@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("RGB", "PNG"), ("RGBA", "PNG"), ("L", "PNG"), ("RGB", "JPEG"), ("RGB", "WEBP")],
)
def test_inpaint_keeps_size_mode_and_known_pixels(client: httpx.Client, mode: str, fmt: str) -> None:
    image = random_image(90, 130, mode, seed=1)  # not a multiple of the network's 64
    data = encode(image, fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert(mode))  # what the server sees
    hole = rect_mask(90, 130, (20, 30, 60, 90))
    response = client.post("/inpaint", **multipart(data, mask_png(hole)))
    result = decode_png(response)
    assert result.size == (130, 90) and result.mode == mode
    out = np.asarray(result)
    np.testing.assert_array_equal(out[~hole], decoded[~hole])
    assert (out[hole] != decoded[hole]).any()  # the hole was really filled by the model
    assert int(response.headers["x-hole-pixels"]) == hole.sum()


def test_json_base64_and_data_url(client: httpx.Client) -> None:
    image = random_image(64, 96, seed=2)
    hole = rect_mask(64, 96, (5, 5, 40, 50))
    payload = {
        "image": base64.b64encode(encode(image)).decode(),
        "mask": "data:image/png;base64," + base64.b64encode(mask_png(hole)).decode(),
        "strategy": "pad",
    }
    result = np.asarray(decode_png(client.post("/inpaint/base64", json=payload)))
    assert result.shape == (64, 96, 3)
    np.testing.assert_array_equal(result[~hole], np.asarray(image)[~hole])


def data_url_pixels(url: str) -> np.ndarray:
    header, _, data = url.partition(",")
    assert header == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


def test_explain_answers_the_same_image_and_the_fusion_maps(client: httpx.Client) -> None:
    image = random_image(90, 130, seed=8)
    hole = rect_mask(90, 130, (20, 30, 60, 90))
    request = multipart(encode(image), mask_png(hole))
    plain = decode_png(client.post("/inpaint", **request))
    assert plain.format == "PNG"  # the default answer is unchanged: the PNG itself
    request["data"]["explain"] = "2,0"
    response = client.post("/inpaint", **request)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = response.json()
    np.testing.assert_array_equal(data_url_pixels(body["image"]), np.asarray(plain))  # the very same image
    assert (body["width"], body["height"], body["alpha_channels"]) == (130, 90, 3)
    assert [block["level"] for block in body["fusion"]] == [0, 2]
    assert [block["scale"] for block in body["fusion"]] == [1.0, 0.25]
    for block in body["fusion"]:
        for name in ("alpha", "alpha_rgb", "raw"):
            assert data_url_pixels(block[name]).shape == (90, 130, 3)
    # The JSON route takes a list; the maps are the same.
    payload = {"image": base64.b64encode(encode(image)).decode(), "mask": base64.b64encode(mask_png(hole)).decode()}
    (block,) = client.post("/inpaint/base64", json={**payload, "explain": [0]}).json()["fusion"]
    np.testing.assert_array_equal(data_url_pixels(block["alpha"]), data_url_pixels(body["fusion"][0]["alpha"]))
    # Unbatched, on the plain model (inference off), through the same model process path.
    unbatched = httpx.post(client.base_url.join("/nobatch/inpaint"), timeout=60, **request)
    assert [b["level"] for b in unbatched.json()["fusion"]] == [0, 2]


def test_iopaint_route(client: httpx.Client) -> None:
    """IOPaint's own JSON (its extra fields included) with data URLs; the answer is the PNG."""
    image = random_image(72, 100, seed=9)
    hole = rect_mask(72, 100, (10, 20, 40, 70))
    body = {
        "image": "data:image/png;base64," + base64.b64encode(encode(image)).decode(),
        "mask": "data:image/png;base64," + base64.b64encode(mask_png(hole)).decode(),
        "ldm_steps": 20,
        "hd_strategy": "Crop",
        "prompt": "",
        "sd_seed": 42,
    }
    response = client.post("/api/v1/inpaint", json=body)
    result = np.asarray(decode_png(response))
    np.testing.assert_array_equal(result[~hole], np.asarray(image)[~hole])
    assert (result[hole] != np.asarray(image)[hole]).any()
    # Plain base64 (no data: prefix) works too, and gives the same image as /inpaint.
    plain = {k: v.partition(",")[2] if k in ("image", "mask") else v for k, v in body.items()}
    again = np.asarray(decode_png(client.post("/api/v1/inpaint", json=plain)))
    same = np.asarray(decode_png(client.post("/inpaint", **multipart(encode(image), mask_png(hole)))))
    np.testing.assert_array_equal(again, same)


def test_known_white_convention(client: httpx.Client) -> None:
    image = random_image(64, 64, seed=3)
    hole = rect_mask(64, 64, (0, 0, 20, 64))
    response = client.post(
        "/inpaint",
        **multipart(encode(image), mask_png(hole, white_is_hole=False), mask_convention="known-white"),
    )
    assert int(response.headers["x-hole-pixels"]) == hole.sum()
    np.testing.assert_array_equal(np.asarray(decode_png(response))[~hole], np.asarray(image)[~hole])


def test_empty_mask_returns_the_input(client: httpx.Client) -> None:
    image = random_image(70, 50, "RGBA", seed=4)
    response = client.post("/inpaint", **multipart(encode(image), mask_png(np.zeros((70, 50), bool))))
    assert response.headers["x-batch-size"] == "0"  # the model was not run
    np.testing.assert_array_equal(np.asarray(decode_png(response)), np.asarray(image))


def test_all_hole_mask(client: httpx.Client) -> None:
    image = random_image(64, 80, seed=5)
    result = decode_png(client.post("/inpaint", **multipart(encode(image), mask_png(np.ones((64, 80), bool)))))
    assert result.size == (80, 64)
    assert not np.array_equal(np.asarray(result), np.asarray(image))


def test_exif_rotation_is_applied_before_the_size_check(client: httpx.Client) -> None:
    """A phone JPEG stored 80 wide × 60 high with "rotate 90" is shown (and answered) 60 × 80."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    jpeg = encode(random_image(60, 80, seed=6), "JPEG", quality=95, exif=exif)
    shown = decode_image(jpeg)
    assert shown.shape == (80, 60, 3)
    hole = rect_mask(80, 60, (10, 10, 40, 40))
    result = decode_png(client.post("/inpaint", **multipart(jpeg, mask_png(hole))))
    assert result.size == (60, 80)
    np.testing.assert_array_equal(np.asarray(result)[~hole], shown[~hole])
    # A mask drawn on the stored (unrotated) pixel grid does not match what the user saw.
    wrong = client.post("/inpaint", **multipart(jpeg, mask_png(rect_mask(60, 80, (0, 0, 5, 5)))))
    assert wrong.status_code == 422 and "differs" in wrong.json()["detail"]


# --------------------------------------------------------------------------- batching
def _post_all(url: str, requests: list[dict]) -> list[httpx.Response]:
    def post(request: dict) -> httpx.Response:
        with httpx.Client(timeout=60) as c:
            return c.post(url + "/inpaint", **request)

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(post, requests))


def test_concurrent_requests_are_batched_and_answered_in_order(server: Server) -> None:
    # Mixed sizes and strategies in one batch: each answer must belong to its own request.
    shapes = [(64, 64), (100, 80), (64, 64), (100, 80)]
    strategies = ["auto", "auto", "pad", "crops"]
    images = [random_image(h, w, seed=10 + i) for i, (h, w) in enumerate(shapes)]
    holes = [rect_mask(h, w, (8 + 2 * i, 8, 40, 50)) for i, (h, w) in enumerate(shapes)]
    requests = [
        multipart(encode(img), mask_png(hole), strategy=s)
        for img, hole, s in zip(images, holes, strategies, strict=True)
    ]
    batched = _post_all(server.url, requests)
    sequential = [httpx.post(server.nobatch_url + "/inpaint", timeout=60, **r) for r in requests]

    sizes = [int(r.headers["x-batch-size"]) for r in batched]
    assert max(sizes) > 1, f"no batching observed: {sizes}"
    assert all(r.headers["x-batch-size"] == "1" for r in sequential)
    for image, hole, b, s in zip(images, holes, batched, sequential, strict=True):
        out_b, out_s = np.asarray(decode_png(b)), np.asarray(decode_png(s))
        assert out_b.shape == np.asarray(image).shape
        np.testing.assert_array_equal(out_b[~hole], np.asarray(image)[~hole])
        # Same model, same input: batch composition may only move the float rounding.
        assert np.abs(out_b.astype(int) - out_s.astype(int)).max() <= 2


def test_unbatched_app_never_batches(server: Server) -> None:
    image, hole = random_image(64, 64, seed=20), rect_mask(64, 64, (5, 5, 30, 30))
    responses = _post_all(server.nobatch_url, [multipart(encode(image), mask_png(hole))] * 3)
    assert [r.headers["x-batch-size"] for r in responses] == ["1", "1", "1"]


def _model_processes(app: str) -> list[psutil.Process]:
    """The processes the application's replicas spawned to run their models."""
    name = f"ServeReplica:{app}:"
    replicas = [p for p in psutil.process_iter(["cmdline"]) if name in " ".join(p.info["cmdline"] or [])]
    children = [child for replica in replicas for child in replica.children()]
    return [child for child in children if "spawn_main" in " ".join(child.cmdline())]


def test_a_dead_model_process_is_replaced_and_none_outlives_its_replica(server: Server) -> None:
    from ray import serve

    settings = configured_settings(source=str(server.model_dir), inference="off", warmup_sizes=[])
    deployment = InpaintDeployment.options(ray_actor_options={"num_cpus": 0}, health_check_period_s=1)
    serve.run(deployment.bind(settings), name="fragile", route_prefix="/fragile")
    url = server.url + "/fragile/inpaint"
    image, hole = random_image(64, 64, seed=21), rect_mask(64, 64, (5, 5, 30, 30))
    request = multipart(encode(image), mask_png(hole))
    (model,) = _model_processes("fragile")
    assert model.pid != os.getpid()
    # A session (so a scheduling group) of its own: the kernel shares the CPUs between the
    # model and the serving stack rather than among all their threads.
    assert os.getsid(model.pid) == model.pid != os.getsid(model.parent().pid)
    decode_png(httpx.post(url, timeout=60, **request))

    model.kill()
    model.wait(10)
    deadline = time.monotonic() + 120
    while (response := httpx.post(url, timeout=60, **request)).status_code != 200:
        assert time.monotonic() < deadline, f"not serving again: {response.status_code} {response.text}"
        time.sleep(1)
    np.testing.assert_array_equal(np.asarray(decode_png(response))[~hole], np.asarray(image)[~hole])
    (replacement,) = _model_processes("fragile")
    assert replacement.pid != model.pid

    # A replica killed outright cannot shut its pool down; its model process must go anyway
    # (Ray's raylet kills the child processes of a worker that died).
    replacement.parent().kill()
    _, alive = psutil.wait_procs([replacement], timeout=30)
    assert not alive, "the model process outlived its killed replica"
    deadline = time.monotonic() + 120
    while not (restarted := _model_processes("fragile")):  # Serve starts a new replica
        assert time.monotonic() < deadline, "no new replica"
        time.sleep(1)
    serve.delete("fragile")
    _, alive = psutil.wait_procs(restarted, timeout=30)
    assert not alive, "the model process outlived its deleted replica"


# --------------------------------------------------------------------------- bad input
def _valid() -> tuple[bytes, bytes]:
    return encode(random_image(64, 64, seed=30)), mask_png(rect_mask(64, 64, (5, 5, 20, 20)))


def _truncated_png() -> bytes:
    data = encode(random_image(100, 100, seed=31))  # noise does not compress: ~30 KB
    return data[: len(data) // 2]


def _json(body: bytes) -> dict:
    return {"content": body, "headers": {"content-type": "application/json"}}


def _bad_requests() -> list[tuple[str, str, int, dict]]:
    """(case, path, expected status, httpx keyword arguments)."""
    image, mask = _valid()
    gif = encode(random_image(64, 64, seed=32), "GIF")
    big = encode(Image.new("RGB", (600, 600)))  # 360,000 px > 512² yet a small upload
    b64 = base64.b64encode(image).decode()
    small_mask = base64.b64encode(mask_png(rect_mask(32, 64, (0, 0, 5, 5)))).decode()
    return [
        ("not an image", "/inpaint", 422, multipart(b"hello, I am text", mask)),
        ("truncated file", "/inpaint", 422, multipart(_truncated_png(), mask)),
        ("empty file", "/inpaint", 422, multipart(b"", mask)),
        ("unsupported format (GIF)", "/inpaint", 422, multipart(gif, mask)),
        ("wrong content type", "/inpaint", 422, {"content": image, "headers": {"content-type": "image/png"}}),
        ("urlencoded form", "/inpaint", 422, {"data": {"image": "x", "mask": "y"}}),
        ("mask size differs", "/inpaint", 422, multipart(image, mask_png(rect_mask(32, 64, (0, 0, 5, 5))))),
        ("over the pixel limit", "/inpaint", 413, multipart(big, encode(Image.new("L", (600, 600))))),
        ("decompression bomb", "/inpaint", 413, multipart(png_bomb(), mask)),
        ("missing mask", "/inpaint", 422, {"files": {"image": ("a.png", image, "image/png")}}),
        ("missing image", "/inpaint", 422, {"files": {"mask": ("m.png", mask, "image/png")}}),
        ("mask as text field", "/inpaint", 422, {"files": {"image": ("a.png", image)}, "data": {"mask": "x"}}),
        ("unknown convention", "/inpaint", 422, multipart(image, mask, mask_convention="hole-black")),
        ("unknown strategy", "/inpaint", 422, multipart(image, mask, strategy="tile")),
        ("huge upload", "/inpaint", 413, multipart(image + b"\0" * (2 * MAX_UPLOAD), mask)),
        (
            "huge chunked upload",  # no Content-Length: the limit is enforced while reading
            "/inpaint",
            413,
            {
                "content": itertools.chain(
                    [b'--zz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'],
                    (b"x" * 65536 for _ in range(2 * MAX_UPLOAD // 65536)),
                ),
                "headers": {"content-type": "multipart/form-data; boundary=zz"},
            },
        ),
        (
            "malformed multipart",
            "/inpaint",
            400,
            {"content": b"--zz\r\nnot a header\r\n\r\nxx", "headers": {"content-type": "multipart/form-data"}},
        ),
        ("malformed JSON", "/inpaint/base64", 422, _json(b"{'image':")),
        ("JSON not an object", "/inpaint/base64", 422, {"json": [1, 2]}),
        ("JSON nested 200k deep", "/inpaint/base64", 400, _json(b"[" * 200_000)),
        ("JSON bad base64", "/inpaint/base64", 422, {"json": {"image": "!!!not base64!!!", "mask": "AAAA"}}),
        ("JSON missing mask", "/inpaint/base64", 422, {"json": {"image": b64}}),
        ("JSON image not a string", "/inpaint/base64", 422, {"json": {"image": 12, "mask": 3}}),
        ("JSON huge", "/inpaint/base64", 413, {"json": {"image": b64 * 40, "mask": b64 * 40}}),
        ("JSON not an image", "/inpaint/base64", 422, {"json": {"image": "aGVsbG8=", "mask": b64}}),
        ("explain not levels", "/inpaint", 422, multipart(image, mask, explain="finest")),
        ("explain a missing level", "/inpaint", 422, multipart(image, mask, explain="0,9")),
        ("JSON explain negative", "/inpaint/base64", 422, {"json": {"image": b64, "mask": b64, "explain": [-1]}}),
        ("IOPaint missing mask", "/api/v1/inpaint", 422, {"json": {"image": b64}}),
        ("IOPaint bad base64", "/api/v1/inpaint", 422, {"json": {"image": "data:image/png;base64,!!", "mask": b64}}),
        ("IOPaint not an image", "/api/v1/inpaint", 422, {"json": {"image": "aGVsbG8=", "mask": b64}}),
        ("IOPaint mask size differs", "/api/v1/inpaint", 422, {"json": {"image": b64, "mask": small_mask}}),
        ("IOPaint huge", "/api/v1/inpaint", 413, {"json": {"image": b64 * 40, "mask": b64 * 40}}),
    ]


@pytest.mark.parametrize(
    ("case", "path", "status", "request_kwargs"),
    _bad_requests(),
    ids=lambda v: v if isinstance(v, str) and not v.startswith("/") else "",
)
def test_bad_input_gets_a_4xx_json_error_and_the_server_goes_on(
    client: httpx.Client, case: str, path: str, status: int, request_kwargs: dict
) -> None:
    response = client.post(path, **request_kwargs)
    assert response.status_code == status, (case, response.text)
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail  # one sentence, shown as is by the web page
    assert_still_serving(client)


# --------------------------------------------------------------------------- fuzzing
_json_values = st.one_of(st.none(), st.integers(), st.text(max_size=20), st.lists(st.integers(), max_size=3))


@st.composite
def _image_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["png", "truncated", "garbage", "empty"]))
    if kind == "garbage":
        return draw(st.binary(max_size=512))
    if kind == "empty":
        return b""
    height, width = draw(st.integers(1, 72)), draw(st.integers(1, 72))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA"]))
    data = encode(random_image(height, width, mode, seed=draw(st.integers(0, 9))))
    return data[: draw(st.integers(0, len(data) - 1))] if kind == "truncated" else data


@st.composite
def _requests(draw: st.DrawFn) -> tuple[str, dict]:
    """(path, httpx keyword arguments)."""
    style = draw(st.sampled_from(["multipart", "json", "raw"]))
    fields = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "image": _image_bytes(),
                "mask": _image_bytes(),
                "mask_convention": st.sampled_from(["hole-white", "known-white", "", "white", "\x00"]),
                "strategy": st.sampled_from(["auto", "pad", "resize", "crops", "", "zoom"]),
            },
        )
    )
    if draw(st.booleans()):
        # A decodable pair of equal size, so that a share of the examples reaches the model.
        height, width = draw(st.integers(1, 72)), draw(st.integers(1, 72))
        fields["image"] = encode(random_image(height, width, draw(st.sampled_from(["L", "RGBA"]))))
        fields["mask"] = encode(random_image(height, width, "L", seed=draw(st.integers(0, 9))))
    if style == "multipart":
        files = {k: (f"{k}.bin", v, "application/octet-stream") for k, v in fields.items() if isinstance(v, bytes)}
        data = {k: v for k, v in fields.items() if isinstance(v, str)}
        return "/inpaint", {"files": files or {"other": ("x", b"x")}, "data": data}
    if style == "json":
        body = {k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in fields.items()}
        body.update(draw(st.dictionaries(st.sampled_from(["image", "mask", "extra"]), _json_values, max_size=2)))
        return "/inpaint/base64", _json(json.dumps(body).encode())
    content_type = draw(st.sampled_from(["multipart/form-data; boundary=b", "application/json", "text/plain", ""]))
    path = draw(st.sampled_from(["/inpaint", "/inpaint/base64"]))
    return path, {"content": draw(st.binary(max_size=1024)), "headers": {"content-type": content_type}}


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(request=_requests())
def test_fuzz_inpaint_never_errors_server_side(client: httpx.Client, request: tuple[str, dict]) -> None:
    path, kwargs = request
    response = client.post(path, **kwargs)
    assert response.status_code < 500, response.text
    event(f"status {response.status_code}")
    if response.status_code == 200:
        decode_png(response)
    else:
        assert 400 <= response.status_code < 500
        assert isinstance(response.json()["detail"], str)


def test_server_healthy_after_fuzzing(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert_still_serving(client)


def test_schemathesis_openapi_fuzz(server: Server) -> None:
    """Requests generated from the published OpenAPI spec: never a 5xx (bounded in count)."""
    schemathesis = pytest.importorskip("schemathesis")
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    checked = []
    for operation in schema.get_all_operations():
        op = operation.ok()
        strategy = op.as_strategy()

        @settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def run(case) -> None:
            response = case.call(base_url=server.url, timeout=60)
            assert response.status_code < 500, (case.path, response.status_code, response.text)

        run()
        checked.append(f"{op.method.upper()} {op.path}")
    assert "POST /inpaint" in checked and "GET /model" in checked


# --------------------------------------------------------------------------- configuration
def test_shipped_config_yaml_is_valid() -> None:
    """The YAML as Serve reads it: its own schema for the deployment options, ours for args."""
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve" / "config.yaml").read_text()))
    (application,) = config.applications
    assert application.import_path == "serve.app:app_builder"
    settings_ = ServeSettings.model_validate(application.args)
    assert settings_ == configured_settings()
    (deployment,) = application.deployments
    assert deployment.max_ongoing_requests == configured_deployment_options()["max_ongoing_requests"]
    assert deployment.name == InpaintDeployment.name
    assert deployment.max_ongoing_requests >= BATCHES_IN_FLIGHT * settings_.max_batch_size  # or batches never fill
    assert deployment.autoscaling_config["max_replicas"] >= deployment.autoscaling_config["min_replicas"]


def test_serve_values_have_one_home_the_config_yaml() -> None:
    """No defaults in the settings model (config.yaml gives every value), none in the decorators."""
    assert all(field.is_required() for field in ServeSettings.model_fields.values())
    with pytest.raises(ValueError, match="max_batch_size"):
        ServeSettings.model_validate(configured_settings().model_dump(exclude={"max_batch_size"}))
    source = (ROOT / "serve" / "app.py").read_text()
    for option in ("max_ongoing_requests=", "max_batch_size=", "batch_wait_timeout_s="):
        assert f"serve.deployment({option}" not in source and f"serve.batch({option}" not in source


def test_ray_env_names_settings_that_ray_reads() -> None:
    """Ray ignores environment variables it does not know, so a misspelt name would silently
    cost the speed it is there for."""
    import ray._raylet
    from ray.serve._private import constants

    settings = read_ray_env()
    assert "RAY_max_direct_call_object_size" in settings
    raylet = Path(ray._raylet.__file__).read_bytes()  # Ray's own settings: RAY_ + the name
    for name in settings:
        if name.startswith("RAY_SERVE_"):
            assert hasattr(constants, name), f"Serve has no setting {name}"
        else:
            assert name.startswith("RAY_") and name.removeprefix("RAY_").encode() in raylet, f"Ray has no {name}"


def test_ray_env_file_format(tmp_path: Path) -> None:
    path = tmp_path / "ray.env"
    path.write_text("# a comment\n\nRAY_A=1\n  RAY_B = 2 \n")
    assert read_ray_env(path) == {"RAY_A": "1", "RAY_B": "2"}
    path.write_text("RAY_A=1\nRAY_B\n")
    with pytest.raises(ValueError, match=r"ray.env:2: expected NAME=value"):
        read_ray_env(path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"sourc": "x"}, "sourc"),
        ({"max_pixels": 0}, "max_pixels"),
        ({"inference": "int4"}, "inference"),
        ({"forward_pixels": 0}, "forward_pixels"),
        ({"batch_wait_timeout_s": -1}, "batch_wait_timeout_s"),
    ],
)
def test_settings_are_validated(args: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"1 validation error for ServeSettings\n{message}"):
        ServeSettings.model_validate({**configured_settings().model_dump(), **args})


# --------------------------------------------------------------------------- model sources
def _same_weights(a: DFNet, b: DFNet) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_auto_source_prefers_the_registry_champion(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    from tracking.registry import register_model

    monkeypatch.chdir(tmp_path)  # mlflow.db and artifacts land here, never in the repository
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_source("auto") == str(pretrained_dir())  # a fresh install serves the shipped model
    (tmp_path / "models").mkdir()
    fallback = build_model("small").save_pretrained(tmp_path / "models" / "dfnet")
    assert resolve_source("auto") == str(fallback.resolve())

    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        register_model(model_dir, "dfnet", "champion", "l1", 0.1)
    finally:
        mlflow.end_run()
    assert resolve_source("auto") == "models:/dfnet@champion"
    inpainter, info = load_inpainter(configured_settings(inference="off"))
    assert info["kind"] == "mlflow" and info["alias"] == "champion" and str(info["version"]) == "1"
    assert _same_weights(inpainter.model, DFNet.from_pretrained(model_dir))
