"""The web console (``GET /ui``) in headless Chromium: generate with an adapter and watch the steps, upload
an adapter, see a trained adapter's loss curve and samples, the server view, scopes, and hostile metadata
that must stay text."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from selenium.common.exceptions import (
    ElementClickInterceptedException,
    NoAlertPresentException,
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from adapters.pictures import PictureLimits
from tests.adapters.conftest import save_bytes
from tests.adapters.factory import diffusers_layout, make_case
from tests.service.conftest import RunningServer, wait_until
from tests.ui.conftest import ADMIN, GEN
from training.evaluate import sample_grid
from training.pictures import run_pictures
from training.plot import plot_loss_curve

PAYLOAD = '<img src=x onerror="window.__pwned=1;alert(1)">'
SCRIPT = "<script>window.__pwned=2;alert(2)</script>"


@pytest.fixture(scope="module")
def adapter_file(base_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("files") / "ink-style.safetensors"
    path.write_bytes(save_bytes(diffusers_layout(make_case(base_model.pipe))))
    return path


def register(server: RunningServer, adapter_id: str, data: bytes, **parts: Any) -> dict[str, Any]:
    """POST /v1/adapters as the admin; ``parts``: metadata (dict) and picture lists by part name."""
    files: list[tuple[str, Any]] = [("file", ("a.safetensors", data)), ("id", (None, adapter_id))]
    if "metadata" in parts:
        files.append(("metadata", (None, json.dumps(parts.pop("metadata")))))
    for part, pictures in parts.items():
        files += [(part, (name, content)) for name, content in pictures]
    with server.client() as http:
        answer = http.post("/v1/adapters", files=files, headers={"Authorization": f"Bearer {ADMIN}"})
    assert answer.status_code in (200, 201), answer.text
    return dict(answer.json())


def by_testid(browser: Any, name: str) -> WebElement:
    return browser.find_element(By.CSS_SELECTOR, f'[data-testid="{name}"]')


RERENDERED = (NoSuchElementException, StaleElementReferenceException, ElementClickInterceptedException)


def wait_for(browser: Any, condition: Callable[[Any], Any], timeout: float = 90) -> Any:
    """Poll ``condition``; an element the console re-rendered meanwhile is looked up again."""
    wait = WebDriverWait(browser, timeout, poll_frequency=0.05, ignored_exceptions=RERENDERED)
    return wait.until(condition)


def click(browser: Any, css: str) -> None:
    """Click the element ``css`` selects once it is there (again if a re-render replaced it)."""

    def clicked(b: Any) -> bool:
        b.find_element(By.CSS_SELECTOR, css).click()
        return True

    wait_for(browser, clicked)


def open_console(browser: Any, server: RunningServer, token: str) -> None:
    """A fresh console (no token in the tab yet), then the token typed into its box, as a user does."""
    browser.get(f"{server.url}/ui")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    wait_for(browser, lambda b: "token" in by_testid(b, "status").text)  # 401: "enter a token"
    field = by_testid(browser, "token")
    field.send_keys(token)
    field.submit()
    scopes = "scopes: admin, generate" if token == ADMIN else "scopes: generate"
    wait_for(browser, lambda b: by_testid(b, "scopes").text == scopes)


def show(browser: Any, view: str) -> None:
    by_testid(browser, f"tab-{view}").click()
    wait_for(browser, lambda b: by_testid(b, f"view-{view}").is_displayed())


def image_loaded(browser: Any, element: WebElement) -> bool:
    return bool(
        browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", element)
    )


def select_adapter(browser: Any, adapter_id: str) -> WebElement:
    show(browser, "adapters")
    click(browser, f'[data-testid="adapter-row"][data-adapter="{adapter_id}"]')
    detail = by_testid(browser, "adapter-detail")
    wait_for(browser, lambda b: detail.is_displayed() and adapter_id in detail.text)
    return detail


def csp_violations(browser: Any) -> list[str]:
    return [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]


def test_generate_with_an_adapter_shows_steps_and_the_image(
    console_server: RunningServer,
    browser: Any,
    adapter_file: Path,
    tmp_path: Path,
    screenshot: Callable[[str], None],
) -> None:
    register(console_server, "ink-style", adapter_file.read_bytes())
    open_console(browser, console_server, ADMIN)
    assert by_testid(browser, "sampler").get_attribute("value") == "ddim"  # the list came from the API
    by_testid(browser, "prompt").send_keys("a lighthouse at dusk")
    for name, value in (("steps", "2"), ("seed", "7")):
        by_testid(browser, name).clear()
        by_testid(browser, name).send_keys(value)
    by_testid(browser, "picker-search").send_keys("ink")
    click(browser, '[data-testid="picker-add"]')
    wait_for(browser, lambda b: "ink-style" in by_testid(b, "picked").text)
    by_testid(browser, "generate").click()

    result = by_testid(browser, "result-image")
    wait_for(browser, lambda b: result.is_displayed() and image_loaded(b, result))
    events = by_testid(browser, "events").text.splitlines()
    assert [e for e in events if e.startswith("step")] == ["step 1/2", "step 2/2"]
    assert events[-1] == "done"
    progress = by_testid(browser, "progress")
    assert progress.get_attribute("value") == progress.get_attribute("max") == "2"
    parameters = json.loads(by_testid(browser, "result-params").text)
    assert parameters["adapters"][0]["id"] == "ink-style" and parameters["seed"] == 7

    # the browser's image is the API's image for the same request
    shown = base64.b64decode(result.get_attribute("src").split(",", 1)[1])
    body = {
        "prompt": "a lighthouse at dusk",
        "steps": 2,
        "seed": 7,
        "adapters": [{"id": "ink-style", "scale": 1}],
    }
    with console_server.client() as http:
        direct = http.post(
            "/v1/generate", json=body, headers={"Authorization": f"Bearer {GEN}", "Accept": "image/png"}
        )
    assert direct.status_code == 200 and shown == direct.content

    by_testid(browser, "copy-curl").click()
    curl = by_testid(browser, "curl")
    wait_for(browser, lambda b: curl.is_displayed())
    assert "/v1/generate" in curl.text and '"ink-style"' in curl.text and ADMIN not in curl.text
    assert "$LORASWAP_TOKEN" in curl.text
    assert csp_violations(browser) == []
    screenshot("generate")

    # image to image: the last result, uploaded as the init image
    init = tmp_path / "init.png"
    init.write_bytes(shown)
    by_testid(browser, "init-image").send_keys(str(init))
    wait_for(browser, lambda b: "init image: init.png" in by_testid(b, "status").text)
    by_testid(browser, "generate").click()
    wait_for(browser, lambda b: "img2img" in by_testid(b, "result-params").text)
    assert json.loads(by_testid(browser, "result-params").text)["strength"] == 0.8


def test_upload_an_adapter_and_see_it_listed(
    console_server: RunningServer,
    browser: Any,
    adapter_file: Path,
    tmp_path: Path,
    screenshot: Callable[[str], None],
) -> None:
    open_console(browser, console_server, ADMIN)
    show(browser, "adapters")
    # the adapter file through the file chooser, the preview dropped on the zone (a real drop event)
    by_testid(browser, "upload").find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(
        str(adapter_file)
    )
    preview = io.BytesIO()
    Image.radial_gradient("L").resize((96, 96)).convert("RGB").save(preview, format="PNG")
    browser.execute_script(
        """const bytes = Uint8Array.from(atob(arguments[1]), (c) => c.charCodeAt(0));
        const files = new DataTransfer();
        files.items.add(new File([bytes], "cover.png", { type: "image/png" }));
        for (const type of ["dragover", "drop"]) {
          const init = { dataTransfer: files, bubbles: true, cancelable: true };
          arguments[0].dispatchEvent(new DragEvent(type, init));
        }""",
        by_testid(browser, "upload"),
        base64.b64encode(preview.getvalue()).decode(),
    )
    wait_for(browser, lambda b: "cover.png" in by_testid(b, "upload").text)
    identifier = by_testid(browser, "upload-id")
    assert identifier.get_attribute("value") == "ink-style"  # suggested from the file name
    identifier.clear()
    identifier.send_keys("uploaded-style")
    by_testid(browser, "upload-triggers").send_keys("inky, sketch")
    by_testid(browser, "upload-submit").click()

    listed = '[data-testid="adapter-list"] [data-adapter="uploaded-style"]'
    wait_for(browser, lambda b: b.find_elements(By.CSS_SELECTOR, listed))
    detail = by_testid(browser, "adapter-detail")
    wait_for(browser, lambda b: "uploaded-style@1" in detail.text)
    wait_for(browser, lambda b: image_loaded(b, by_testid(b, "picture-preview")))
    assert "inky, sketch" in by_testid(browser, "metadata").text
    assert "cover.png" in detail.text
    by_testid(browser, "adapter-search").send_keys("uploaded")
    rows = browser.find_elements(By.CSS_SELECTOR, '[data-testid="adapter-row"]')
    assert [r.get_attribute("data-adapter") for r in rows] == ["uploaded-style"]
    screenshot("upload")


def test_a_trained_adapter_shows_its_loss_curve_and_samples(
    console_server: RunningServer,
    browser: Any,
    adapter_file: Path,
    tmp_path: Path,
    screenshot: Callable[[str], None],
) -> None:
    # what `loraswap train --register` sends: the run folder's loss curve and last sample grid
    rows = [
        {"step": s, "train_loss": 0.3 / (1 + s / 10) + 0.01 * (s % 3), "val_loss": None} for s in range(1, 61)
    ]
    rows[19]["val_loss"], rows[59]["val_loss"] = 0.2, 0.09
    plot_loss_curve(rows, tmp_path / "loss_curve.png", title="trained-style: loss")
    tiles = [Image.new("RGB", (32, 32), c) for c in ("#345", "#c84")]
    (tmp_path / "samples").mkdir()
    sample_grid(tiles[:1], tiles[1:], ["sks, a gold circle"], [0], "final (step 60): base | lora").save(
        tmp_path / "samples" / "final.png"
    )
    pictures = run_pictures(tmp_path, PictureLimits())
    metadata = {
        "trigger_words": ["sks"],
        "training": {"steps": 60, "learning_rate": 0.01, "optimizer": "adamw"},
    }
    register(
        console_server,
        "trained-style",
        adapter_file.read_bytes(),
        metadata=metadata,
        **{p.role: [(p.name, p.data)] for p in pictures},
    )
    open_console(browser, console_server, GEN)
    detail = select_adapter(browser, "trained-style")
    for role in ("loss_curve", "samples"):
        wait_for(browser, lambda b, role=role: image_loaded(b, by_testid(b, f"picture-{role}")))
    sizes = browser.execute_script(
        "return [...document.querySelectorAll('[data-testid=pictures] img')]"
        ".map(i => [i.naturalWidth, i.naturalHeight])"
    )
    assert sizes[0] == [800, 450]  # the loss curve as drawn
    assert "training optimizer" in detail.text and "adamw" in detail.text
    screenshot("adapter-pictures")


def test_scopes_decide_what_the_console_offers(
    console_server: RunningServer, browser: Any, adapter_file: Path
) -> None:
    register(console_server, "scoped", adapter_file.read_bytes())
    open_console(browser, console_server, GEN)
    assert by_testid(browser, "scopes").text == "scopes: generate"
    select_adapter(browser, "scoped")
    assert not by_testid(browser, "adapter-actions").is_displayed()
    assert not browser.find_element(By.ID, "upload-form").is_displayed()
    open_console(browser, console_server, ADMIN)
    select_adapter(browser, "scoped")
    assert by_testid(browser, "adapter-actions").is_displayed()
    assert browser.find_element(By.ID, "upload-form").is_displayed()
    # the token is in sessionStorage, never in a URL
    assert browser.execute_script("return sessionStorage.getItem('loraswap.token')") == ADMIN
    assert ADMIN not in browser.current_url
    assert browser.execute_script("return localStorage.length") == 0


def test_server_view_shows_pinned_adapters_and_recent_requests(
    console_server: RunningServer, browser: Any, adapter_file: Path, screenshot: Callable[[str], None]
) -> None:
    register(console_server, "pinned-style", adapter_file.read_bytes())
    with console_server.client() as http:
        body = {"prompt": "x", "steps": 2, "seed": 1, "adapters": [{"id": "pinned-style"}]}
        assert (
            http.post("/v1/generate", json=body, headers={"Authorization": f"Bearer {GEN}"}).status_code
            == 200
        )
    open_console(browser, console_server, ADMIN)
    select_adapter(browser, "pinned-style")
    click(browser, '[data-testid="pin"]')
    wait_for(browser, lambda b: "pinned" in by_testid(b, "status").text)
    show(browser, "server")
    tier = '[data-testid="tier-device"]'
    wait_for(browser, lambda b: "pinned-style@1" in b.find_element(By.CSS_SELECTOR, tier).text)
    assert "pinned" in browser.find_element(By.CSS_SELECTOR, tier).text
    assert "ready" in by_testid(browser, "server-summary").text
    recent = browser.find_elements(By.CSS_SELECTOR, '[data-testid="recent-request"]')
    assert recent and "pinned-style@1" in recent[0].text and "denoise" in recent[0].text
    screenshot("server")


def test_hostile_metadata_and_names_stay_text(
    console_server: RunningServer, browser: Any, adapter_file: Path
) -> None:
    png = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(png, format="PNG")
    metadata = {
        "title": PAYLOAD,
        "description": SCRIPT,
        "trigger_words": [PAYLOAD, SCRIPT],
        "training": {"optimizer": PAYLOAD, "lr_scheduler": SCRIPT},
        "dataset": {"name": SCRIPT},
    }
    register(
        console_server,
        "hostile",
        adapter_file.read_bytes(),
        metadata=metadata,
        picture=[(f"{PAYLOAD}.png", png.getvalue())],
    )
    with console_server.client() as http:  # ids are never free text: a payload is refused
        refused = http.post(
            "/v1/adapters",
            files=[("file", ("a.safetensors", adapter_file.read_bytes())), ("id", (None, PAYLOAD))],
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
    assert refused.status_code == 422 and refused.json()["error"]["type"] == "adapter_ref_invalid"
    open_console(browser, console_server, ADMIN)
    by_testid(browser, "prompt").send_keys(PAYLOAD)
    by_testid(browser, "steps").clear()
    by_testid(browser, "steps").send_keys("1")
    by_testid(browser, "generate").click()
    wait_for(browser, lambda b: by_testid(b, "result-image").is_displayed())
    assert json.loads(by_testid(browser, "result-params").text)["prompt"] == PAYLOAD
    detail = select_adapter(browser, "hostile")
    wait_for(browser, lambda b: image_loaded(b, by_testid(b, "picture-preview")))
    text = detail.text
    assert PAYLOAD in text and SCRIPT in text  # shown, as text
    assert browser.find_elements(By.CSS_SELECTOR, 'img[src="x"], main script') == []
    assert browser.execute_script("return window.__pwned") is None
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018
    with httpx.Client(base_url=console_server.url) as http:
        page = http.get("/ui").text
    assert "<script>" not in page and " on" not in page.replace(" one", "")  # no inline script or handlers


def test_cancel_stops_a_running_job(console_server: RunningServer, browser: Any) -> None:
    open_console(browser, console_server, GEN)
    by_testid(browser, "prompt").send_keys("a long one")
    for name, value in (("steps", "150"), ("width", "32"), ("height", "32")):  # ~ 50 ms a step
        by_testid(browser, name).clear()
        by_testid(browser, name).send_keys(value)
    by_testid(browser, "generate").click()
    wait_for(browser, lambda b: "step 1/150" in by_testid(b, "events").text)
    by_testid(browser, "cancel").click()
    wait_for(browser, lambda b: by_testid(b, "events").text.splitlines()[-1] == "cancelled")
    assert by_testid(browser, "progress-text").text == "cancelled"
    assert not by_testid(browser, "result-image").is_displayed()
    assert by_testid(browser, "generate").is_enabled()

    def last_outcome() -> str:
        with console_server.client() as http:
            recent = http.get("/v1/server", headers={"Authorization": f"Bearer {GEN}"}).json()["recent"]
        return str(recent[0]["outcome"]) if recent and recent[0]["steps"] == 150 else ""

    wait_until(lambda: last_outcome() == "cancelled", "the cancelled job in the recent requests")
