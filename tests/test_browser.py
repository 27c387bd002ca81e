"""The web page in a real browser: headless Chromium loads `/`, paints a stroke, submits, and
gets the completed image back. A screenshot is kept as a test artifact.

Uses the system Chromium (/usr/bin/chromium, Debian's package) through Playwright; Playwright's
own browser downloads are never used. Screenshots go to $TEST_ARTIFACTS_DIR or test-artifacts/.
"""

import base64
import io
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (install Debian's `chromium` package)"
)


@pytest.fixture(scope="module")
def artifacts_dir() -> Path:
    path = Path(os.environ.get("TEST_ARTIFACTS_DIR") or ROOT / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def page_url(ray_local, free_loopback_port, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Serve the shipped pretrained model (what a fresh install serves) on a free loopback port;
    shut down afterwards."""
    from ray import serve

    from dfnet.pretrained import pretrained_dir
    from serve.app import InpaintDeployment
    from serve.schemas import ServeSettings

    model_dir = pretrained_dir()
    serve.shutdown()  # a Serve left by another file would keep its own port
    port = free_loopback_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # Eager: this test is about the page. The default, compiled path is served end to end by
    # tests/test_tune.py::test_serve_deploy_serves_the_champion.
    settings = ServeSettings(source=str(model_dir), inference="eager", warmup_sizes=[])
    deployment = InpaintDeployment.options(ray_actor_options={"num_cpus": 0})
    serve.run(deployment.bind(settings), name="browser", route_prefix="/")
    yield f"http://127.0.0.1:{port}/"
    serve.shutdown()


def test_draw_submit_and_get_the_completed_image(page_url: str, artifacts_dir: Path, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.png"
    width, height = 240, 200
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(photo)

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            page_errors: list[str] = []
            page.on("pageerror", lambda exc: page_errors.append(str(exc)))
            page.goto(page_url)
            # The page fetched GET /model and shows what is loaded.
            sync_api.expect(page.locator("#model-info")).to_contain_text("small", timeout=20_000)

            page.set_input_files("#file", str(photo))
            canvas = page.locator("#canvas")
            sync_api.expect(canvas).to_be_visible()
            box = canvas.bounding_box()
            assert box is not None
            # One stroke across the middle of the image.
            y = box["y"] + box["height"] / 2
            page.mouse.move(box["x"] + box["width"] * 0.25, y)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.75, y, steps=8)
            page.mouse.up()

            with page.expect_response(lambda r: r.url.endswith("/inpaint")) as answer:
                page.click("#inpaint")
            response = answer.value
            assert response.status == 200 and response.headers["content-type"] == "image/png"

            sync_api.expect(page.locator('#result[data-status="done"]')).to_be_attached(timeout=60_000)
            sync_api.expect(page.locator("#error")).to_have_text("")
            natural = page.eval_on_selector("#result", "img => [img.naturalWidth, img.naturalHeight]")
            assert natural == [width, height]
            # The bytes the page shows (its blob URL), read back through the page itself.
            data_url = page.evaluate(
                """async () => {
                    const blob = await (await fetch(document.getElementById("result").src)).blob();
                    return await new Promise((resolve) => {
                        const reader = new FileReader();
                        reader.onload = () => resolve(reader.result);
                        reader.readAsDataURL(blob);
                    });
                }"""
            )
            result_png = base64.b64decode(data_url.partition(",")[2])
            page.screenshot(path=str(artifacts_dir / "browser-inpaint.png"), full_page=True)
            assert not page_errors, page_errors
        finally:
            browser.close()

    # What the page received is a completion of our photo: same size, pixels kept off the stroke,
    # and a band of changed pixels where the stroke was drawn.
    original = np.asarray(Image.open(photo))
    result = np.asarray(Image.open(io.BytesIO(result_png)).convert("RGB"))
    assert result.shape == original.shape
    changed = (result != original).any(axis=2)
    assert changed[height // 2, width // 2]  # under the stroke
    assert not changed[: height // 6].any() and not changed[-height // 6 :].any()  # far from it
    assert httpx.get(page_url + "healthz").json() == {"status": "ok"}
