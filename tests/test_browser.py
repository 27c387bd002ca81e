"""The web page in a real browser: headless Chromium drives the editor against the real Serve app
and checks what the page sends and gets back.

One browser session walks through the page like a user: open (paste, drop, file), paint, erase,
undo and redo, upload a mask, zoom and pan, inpaint, keep editing on the result, step back in
the history, compare with the original, view the fusion blocks' α and C, download, a server error
shown inline, a 12-megapixel photo round trip, and IOPaint's JSON route. The masks and images the
page sends are read from the requests themselves. Screenshots (editing, compare, α) go to
$TEST_ARTIFACTS_DIR or test-artifacts/; docs/screenshots/ holds copies.

Uses the system Chromium (/usr/bin/chromium, Debian's package) through Playwright; Playwright's
own browser downloads are never used.
"""

import base64
import io
import math
import os
import re
from pathlib import Path
from typing import Any

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
MAX_PIXELS = 12_000_000  # the 4000×3000 photo fits exactly; a 3500² one is refused
MARKER = (335, 55)  # (x, y) of a magenta square painted into the photo
MAGENTA = (255, 0, 255)

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
    from serve.schemas import configured_settings

    model_dir = pretrained_dir()
    serve.shutdown()  # a Serve left by another file would keep its own port
    port = free_loopback_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # Eager: this test is about the page. The default, compiled path is served end to end by
    # tests/test_tune.py::test_serve_deploy_serves_the_champion.
    settings = configured_settings(source=str(model_dir), inference="eager", warmup_sizes=[], max_pixels=MAX_PIXELS)
    deployment = InpaintDeployment.options(ray_actor_options={"num_cpus": 0})
    serve.run(deployment.bind(settings), name="browser", route_prefix="/")
    yield f"http://127.0.0.1:{port}/"
    serve.shutdown()


# --------------------------------------------------------------------------- test data
def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def marked_photo() -> np.ndarray:
    """A real photo (the cat of scikit-image, 451×300) with a magenta square at MARKER."""
    from dfnet.data import sample_photos

    path = sample_photos().get("skimage/chelsea.png")
    if path is None:
        pytest.skip("scikit-image's sample photos are not installed")
    array = np.asarray(Image.open(path).convert("RGB")).copy()
    x, y = MARKER
    array[y - 6 : y + 6, x - 6 : x + 6] = MAGENTA
    return array


def large_photo(width: int = 4000, height: int = 3000) -> np.ndarray:
    """12 MP of smooth gradients and fine texture: every pixel differs from its neighbours, yet
    the PNG stays well under the upload limit."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x * 7 + y * 13) % 256], axis=2).astype(np.uint8)


def hole_of(mask_png: bytes) -> np.ndarray:
    """A mask the page sent, as a bool hole (True = fill); it must be strictly binary."""
    mask = pixels(mask_png)
    assert set(np.unique(mask[..., :3])) <= {0, 255}
    return mask[..., 0] == 255


# --------------------------------------------------------------------------- page helpers
JS_MAGENTA = """() => {
    const c = document.getElementById("view"), d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let n = 0, sx = 0, sy = 0;
    for (let i = 0; i < d.length; i += 4) {
        if (d[i] > 200 && d[i + 1] < 70 && d[i + 2] > 200) {
            n++; const p = i / 4; sx += p % c.width; sy += Math.floor(p / c.width);
        }
    }
    const r = c.getBoundingClientRect(), k = r.width / c.width;
    return n ? {count: n, x: r.left + (sx / n + 0.5) * k, y: r.top + (sy / n + 0.5) * k} : {count: 0};
}"""
JS_PIXEL = """([x, y]) => {
    const c = document.getElementById("view"), r = c.getBoundingClientRect(), k = c.width / r.width;
    const at = [Math.floor((x - r.left) * k), Math.floor((y - r.top) * k)];
    return Array.from(c.getContext("2d").getImageData(at[0], at[1], 1, 1).data.slice(0, 3));
}"""
JS_GIVE = """async ([b64, name, how]) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const data = new DataTransfer();
    data.items.add(new File([bytes], name, {type: "image/png"}));
    if (how === "paste") document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: data, bubbles: true}));
    else document.getElementById("stage").dispatchEvent(
        new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
}"""
JS_PEN_STROKE = """([x, y]) => {
    const overlay = document.getElementById("overlay");
    for (const [type, dx] of [["pointerdown", 0], ["pointermove", 20], ["pointerup", 20]]) {
        overlay.dispatchEvent(new PointerEvent(type, {pointerType: "pen", pointerId: 7, isPrimary: true,
            clientX: x + dx, clientY: y, button: type === "pointermove" ? -1 : 0, buttons: 1, bubbles: true}));
    }
}"""
# Chromium does not hand file-backed request bodies to Playwright, so the forms the page posts
# are recorded as it passes them to fetch() and read back as sent.
JS_RECORD_FORMS = """(() => {
    const send = window.fetch;
    window.sentForms = [];
    window.fetch = function (url, init) {
        if (init && init.body instanceof FormData) window.sentForms.push(init.body);
        return send.apply(this, arguments);
    };
})();"""
JS_RESULT = """async () => {
    const blob = await (await fetch(document.getElementById("download").href)).blob();
    return await new Promise((resolve) => {
        const reader = new FileReader();
        reader.onload = () => resolve(reader.result.split(",")[1]);
        reader.readAsDataURL(blob);
    });
}"""
JS_LAST_FORM = """async () => {
    const fields = {};
    for (const [name, value] of window.sentForms.at(-1).entries()) {
        fields[name] = typeof value === "string" ? btoa(value) : await new Promise((resolve) => {
            const reader = new FileReader();
            reader.onload = () => resolve(reader.result.split(",")[1]);
            reader.readAsDataURL(value);
        });
    }
    return fields;
}"""


class Editor:
    """The page under test, driven through its UI, with what a user would see read back."""

    def __init__(self, page: Any, expect: Any):
        self.page, self.expect = page, expect

    def frame(self) -> None:
        self.page.evaluate("() => window.dfnetEditor.frame()")

    def give(self, data: bytes, name: str, how: str) -> None:
        self.page.evaluate(JS_GIVE, [base64.b64encode(data).decode(), name, how])

    def fit_origin(self, width: int, height: int) -> tuple[float, float]:
        """Where the photo's (0, 0) is on screen at the fitted view (centred, never upscaled)."""
        box = self.page.locator("#overlay").bounding_box()
        scale = min(1.0, box["width"] / width, box["height"] / height)
        assert scale == 1.0, "the small photo fits the stage unscaled"
        return box["x"] + math.floor((box["width"] - width) / 2 + 0.5), box["y"] + math.floor(
            (box["height"] - height) / 2 + 0.5
        )

    def stroke(self, points: list[tuple[float, float]]) -> None:
        mouse = self.page.mouse
        mouse.move(*points[0])
        mouse.down()
        for point in points[1:]:
            mouse.move(*point, steps=6)
        mouse.up()
        self.frame()

    def magenta(self) -> dict:
        self.frame()
        return self.page.evaluate(JS_MAGENTA)

    def pixel(self, x: float, y: float) -> list[int]:
        self.frame()
        return self.page.evaluate(JS_PIXEL, [x, y])

    def inpaint(self, timeout: float = 120_000, watch: bool = False) -> tuple[dict[str, bytes], bytes]:
        """Click Inpaint; the form fields sent and the PNG answered, once the page has it.
        `watch`: also see the running indicator and its elapsed time (for a slow request)."""
        with self.page.expect_response(lambda r: r.url.endswith("/inpaint"), timeout=timeout) as answer:
            self.page.click("#inpaint")
            if watch:
                self.expect(self.page.locator("#busy")).to_be_visible()
                self.expect(self.page.locator("#elapsed")).to_have_text(re.compile(r"^\d+\.\d s$"))
        response = answer.value
        assert response.status == 200 and response.headers["content-type"] == "image/png", response.text()
        self.expect(self.page.locator('#stage[data-busy="false"]')).to_be_attached(timeout=timeout)
        self.expect(self.page.locator("#error")).to_have_text("")
        self.expect(self.page.locator("#busy")).to_be_hidden()
        self.expect(self.page.locator("#status")).to_have_text(re.compile(r"^Inpainting done in \d+\.\d s$"))
        sent = {name: base64.b64decode(value) for name, value in self.page.evaluate(JS_LAST_FORM).items()}
        # The answer as the page holds it (what it shows and downloads).
        return sent, base64.b64decode(self.page.evaluate(JS_RESULT))

    def shot(self, path: Path) -> None:
        self.frame()
        self.page.screenshot(path=str(path), full_page=True)


# --------------------------------------------------------------------------- the walk-through
def test_editor_walkthrough(page_url: str, artifacts_dir: Path, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    photo = marked_photo()
    photo_png = png(photo)
    height, width = photo.shape[:2]

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900}, accept_downloads=True)
            page_errors: list[str] = []
            page.on("pageerror", lambda exc: page_errors.append(str(exc)))
            page.add_init_script(JS_RECORD_FORMS)
            page.goto(page_url)
            editor = Editor(page, expect)
            # The page shows which model and inference path serve, from GET /model.
            expect(page.locator("#model-info")).to_contain_text("preset small", timeout=20_000)
            expect(page.locator("#model-info")).to_contain_text("inference path: eager")
            expect(page.locator("#explain-level option")).to_have_count(4)  # the model's fusion blocks
            shortcuts = page.locator("#shortcuts").inner_text()
            for key in ("[", "]", "Ctrl", "Shift", "Space", "Esc", "undo", "redo", "compare"):
                assert key in shortcuts

            # Open: paste from the clipboard, then drop a file (it replaces the pasted one).
            editor.give(png(np.zeros((48, 64, 3), np.uint8)), "pasted.png", "paste")
            expect(page.locator("#stage")).to_have_attribute("data-width", "64")
            editor.give(photo_png, "cat.png", "drop")
            expect(page.locator("#stage")).to_have_attribute("data-width", str(width))

            def at(x: float, y: float) -> tuple[float, float]:
                left, top = editor.fit_origin(width, height)
                return left + x, top + y

            # Brush size on [ and ]: 30 → 38 → 30 screen px (= photo px at this zoom).
            page.focus("#stage")
            page.keyboard.press("]")
            expect(page.locator("#brush")).to_have_value("38")
            page.keyboard.press("[")
            expect(page.locator("#brush")).to_have_value("30")

            # Paint H and V, erase across H, undo twice (the erase, then V), redo once (V).
            editor.stroke([at(60, 150), at(260, 150)])  # H
            editor.stroke([at(380, 150), at(380, 270)])  # V
            page.keyboard.press("e")
            editor.stroke([at(160, 110), at(160, 190)])  # eraser across H
            page.keyboard.press("b")
            editor.shot(artifacts_dir / "editing.png")
            page.keyboard.press("Control+z")
            page.keyboard.press("Control+z")
            page.keyboard.press("Control+Shift+z")
            sent, first = editor.inpaint()
            assert sent["image"] == photo_png  # the file itself, as dropped
            hole = hole_of(sent["mask"])
            assert hole.shape == (height, width)
            assert hole[150, 60:260].all()  # H, whole again: the erase was undone
            assert hole[160:260, 380].all()  # V, back by redo
            assert not hole[:100].any() and not hole[:, :40].any()
            assert pixels(first).shape == photo.shape
            expect(page.locator("#history li")).to_have_count(2)  # the original and the result

            # Step back to the original; upload a ready mask (H as a rectangle) and erase across it.
            page.locator("#history button").first.click()
            wrong = tmp_path / "wrong.png"
            Image.fromarray(np.zeros((10, 10), np.uint8)).save(wrong)
            page.set_input_files("#mask-file", str(wrong))
            expect(page.locator("#error")).to_have_text(f"The mask is 10×10; the image is {width}×{height}.")
            ready = np.zeros((height, width), np.uint8)
            ready[140:160, 60:260] = 255
            (tmp_path / "mask.png").write_bytes(png(ready))
            page.set_input_files("#mask-file", str(tmp_path / "mask.png"))
            expect(page.locator("#undo")).to_be_enabled()  # the mask is in, as one undoable step
            page.focus("#stage")
            page.keyboard.press("e")
            editor.stroke([at(160, 110), at(160, 190)])
            page.keyboard.press("b")
            sent, second = editor.inpaint()
            assert sent["image"] == photo_png  # stepped back: the original again
            hole = hole_of(sent["mask"])
            assert hole[145, 70:130].all() and hole[145, 190:250].all()  # the uploaded mask
            assert not hole[140:160, 150:170].any()  # erased
            assert not hole[:130].any() and not hole[170:].any()
            expect(page.locator("#history li")).to_have_count(2)  # the first result gave way

            # Zoom on the marker (wheel), pan (Space+drag), then paint on the marker itself.
            before = editor.magenta()
            page.mouse.move(*at(*MARKER))
            for _ in range(3):
                page.mouse.wheel(0, -300)
            zoomed = editor.magenta()
            assert zoomed["count"] > 4 * before["count"]
            page.focus("#stage")
            page.keyboard.down("Space")
            editor.stroke([(zoomed["x"], zoomed["y"]), (zoomed["x"] - 120, zoomed["y"] + 80)])
            page.keyboard.up("Space")
            panned = editor.magenta()
            assert abs(panned["x"] - (zoomed["x"] - 120)) < 2 and abs(panned["y"] - (zoomed["y"] + 80)) < 2
            assert page.locator("#undo").is_disabled()  # panning painted nothing
            page.locator("#brush").fill("200")
            editor.stroke([(panned["x"], panned["y"])])  # one dot, 200 screen px
            sent, third = editor.inpaint()
            # Keep editing: the image sent is the previous result, byte for byte.
            assert sent["image"] == second
            hole = hole_of(sent["mask"])
            x, y = MARKER
            # The dot landed on the marker, all of it: strokes stay aligned with the zoomed photo.
            assert hole[y - 6 : y + 6, x - 6 : x + 6].all()
            # 200 screen px at a zoom of about 6: about 33 photo px across, centred on the marker.
            assert 20 * 20 < hole.sum() < 40 * 40
            assert not hole[y, x + 25] and not hole[y, x - 25] and not hole[y + 25, x]
            result = pixels(third)
            np.testing.assert_array_equal(result[~hole], pixels(second)[~hole])

            # Compare: the marker, filled in the result, is back while C is held or the slider is over.
            page.keyboard.press("Escape")
            expect(page.locator("#zoom-value")).to_have_text("100 %")
            # Pens (and touch) paint too: pointer events, whatever the pointer.
            page.evaluate(JS_PEN_STROKE, at(100, 250))
            expect(page.locator("#undo")).to_be_enabled()
            page.keyboard.press("Control+z")
            expect(page.locator("#undo")).to_be_disabled()
            marker = at(*MARKER)
            assert editor.pixel(*marker) != list(MAGENTA)
            page.keyboard.down("c")
            expect(page.locator("#stage")).to_have_attribute("data-view", "original")
            assert editor.pixel(*marker) == list(MAGENTA)
            page.keyboard.up("c")
            assert editor.pixel(*marker) != list(MAGENTA)
            page.locator("#compare-slider").fill("100")
            assert editor.pixel(*marker) == list(MAGENTA)
            page.locator("#compare-slider").fill("50")
            editor.shot(artifacts_dir / "compare.png")
            page.locator("#compare-slider").fill("0")
            assert editor.pixel(*marker) != list(MAGENTA)

            # α and C of the finest fusion block, asked on demand, over the same view.
            shown = editor.pixel(*at(200, 150))
            with page.expect_response(lambda r: r.url.endswith("/inpaint")) as answer:
                page.click("#view-alpha")
            assert answer.value.headers["content-type"] == "application/json"
            expect(page.locator("#stage")).to_have_attribute("data-view", "alpha")
            fusion = answer.value.json()["fusion"]
            assert [block["level"] for block in fusion] == [0]
            alpha = pixels(base64.b64decode(fusion[0]["alpha"].partition(",")[2]))
            assert editor.pixel(*at(200, 150)) == list(alpha[150, 200]) != shown  # the heat map, 1:1
            editor.shot(artifacts_dir / "alpha.png")
            page.click("#view-raw")
            expect(page.locator("#stage")).to_have_attribute("data-view", "raw")
            page.keyboard.press("1")
            expect(page.locator("#stage")).to_have_attribute("data-view", "result")
            assert editor.pixel(*at(200, 150)) == shown

            # Download: the result at the photo's own size, as PNG.
            with page.expect_download() as download:
                page.click("#download")
            saved = Path(download.value.path()).read_bytes()
            assert saved == third and Image.open(io.BytesIO(saved)).format == "PNG"

            # A server error is shown inline: 3500² is over the server's pixel limit.
            editor.give(png(np.full((3500, 3500, 3), 90, np.uint8)), "huge.png", "drop")
            # The browser decodes 12 megapixels first: slow on a loaded 2-core machine.
            expect(page.locator("#stage")).to_have_attribute("data-width", "3500", timeout=60_000)
            box = page.locator("#overlay").bounding_box()
            editor.stroke([(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)])
            page.click("#inpaint")
            expect(page.locator("#error")).to_contain_text("Error 413: image:", timeout=60_000)

            check_large_photo(page, editor, tmp_path)
            check_iopaint_route(page, photo_png, photo)
            assert not page_errors, page_errors
        finally:
            browser.close()
    assert httpx.get(page_url + "healthz").json() == {"status": "ok"}


def check_large_photo(page: Any, editor: Editor, tmp_path: Path) -> None:
    """12 MP: shown scaled, drawn on without redrawing the photo, sent and answered at full size,
    bit-exact outside the hole; the download is the full-size PNG."""
    large = large_photo()
    path = tmp_path / "large.png"
    path.write_bytes(png(large))
    page.set_input_files("#file", str(path))
    editor.expect(page.locator("#stage")).to_have_attribute("data-width", "4000")
    view = page.eval_on_selector("#view", "c => [c.width, c.height, c.getBoundingClientRect().width]")
    assert view[0] < 2000 and view[2] < 1200  # a view of the stage's size, not 12 MP
    page.locator("#brush").fill("30")
    editor.frame()
    before = page.evaluate("() => ({...window.dfnetEditor.stats})")
    box = page.locator("#overlay").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    editor.stroke([(cx - 40, cy), (cx + 40, cy + 10), (cx + 60, cy - 20)])
    after = page.evaluate("() => ({...window.dfnetEditor.stats})")
    assert after["segments"] > before["segments"] + 3
    assert after["imageRenders"] == before["imageRenders"]  # drawing never redraws the 12 MP photo
    sent, answer = editor.inpaint(timeout=240_000, watch=True)
    assert sent["image"] == path.read_bytes()  # sent at full size, as it is
    hole = hole_of(sent["mask"])
    assert hole.shape == (3000, 4000) and 0 < hole.sum() < 500_000  # 30 screen px: ~230 photo px
    result = pixels(answer)
    assert result.shape == large.shape
    np.testing.assert_array_equal(result[~hole], large[~hole])  # bit-exact outside the hole
    assert (result[hole] != large[hole]).any()
    with page.expect_download() as download:
        page.click("#download")
    saved = Path(download.value.path()).read_bytes()
    assert saved == answer and Image.open(io.BytesIO(saved)).size == (4000, 3000)


def check_iopaint_route(page: Any, photo_png: bytes, photo: np.ndarray) -> None:
    """IOPaint's JSON, as its own page sends it (data URLs), from this page's origin."""
    hole = np.zeros(photo.shape[:2], bool)
    hole[100:140, 200:260] = True
    body = {
        "image": "data:image/png;base64," + base64.b64encode(photo_png).decode(),
        "mask": "data:image/png;base64," + base64.b64encode(png(hole.astype(np.uint8) * 255)).decode(),
        "hd_strategy": "Original",
        "sd_seed": 42,
    }
    answer = page.evaluate(
        """async (body) => {
            const resp = await fetch("api/v1/inpaint", {method: "POST", headers: {"content-type": "application/json"},
                                                        body: JSON.stringify(body)});
            const bytes = new Uint8Array(await resp.arrayBuffer());
            let text = ""; for (const b of bytes) text += String.fromCharCode(b);
            return {status: resp.status, type: resp.headers.get("content-type"), data: btoa(text)};
        }""",
        body,
    )
    assert answer["status"] == 200 and answer["type"] == "image/png"
    result = pixels(base64.b64decode(answer["data"]))
    np.testing.assert_array_equal(result[~hole], photo[~hole])
    assert (result[hole] != photo[hole]).any()
