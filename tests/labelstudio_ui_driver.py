"""Correct boxes in Label Studio's labeling page the way a reviewer does: log in, open a task, drag a box,
delete one, press Submit. Real mouse and keyboard events in headless Chromium (Playwright driving the system
``chromium``; Playwright's own browser downloads are never used); no Label Studio API is called here.

Written against Label Studio 1.23's UI. A task with predictions opens with them as a draft annotation
(the proposed boxes); the labeled image is the page's largest ``img`` and its on-screen box is the image
(the boxes are drawn on canvases over it), so a box at normalized ``(x, y)`` is clicked at
``img.left + x * img.width``. Nothing leaves the machine: Chromium resolves no host name but the
server's. A screenshot is saved on failure (its path is in the error), and after each step when
``screenshot_dir`` is given.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import sync_playwright
from tests.mlflow_ui_driver import CHROMIUM_ARGS, UIDriverError, chromium_path

IMAGE_SIZE = "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width])"


class LabelingPage:
    """The labeling page of one logged-in browser: open a task, move or delete boxes, submit."""

    def __init__(self, page, base_url: str, screenshot_dir: Path | None, timeout: float):
        self.page, self.base_url, self.timeout = page, base_url, timeout
        self.screenshot_dir = screenshot_dir
        self.steps = 0
        self.task: int | None = None

    def shot(self, step: str) -> None:
        if self.screenshot_dir is not None:
            self.steps += 1
            self.page.screenshot(path=str(self.screenshot_dir / f"{self.steps:02d}-{step}.png"))

    def open_task(self, project_id: int, task_id: int) -> None:
        """The task's labeling page, with its draft (the proposed boxes) drawn over the image."""
        self.task = task_id
        self.page.goto(f"{self.base_url}/projects/{project_id}/data?task={task_id}", wait_until="domcontentloaded")
        self.page.get_by_role("button", name="Submit").wait_for(state="visible")
        self._wait(lambda: self._image() is not None, f"task {task_id}: the image did not load")
        self.page.wait_for_timeout(300)  # the regions are drawn right after the image
        self.shot(f"task-{task_id}")

    def _image(self) -> dict | None:
        """The labeled image's on-screen box (the largest loaded ``img``), or None while it loads."""
        best = None
        for img in self.page.locator("img").all():
            box = img.bounding_box()
            loaded = img.evaluate("i => i.complete && i.naturalWidth > 0")
            if box and loaded and (best is None or box["width"] * box["height"] > best["width"] * best["height"]):
                best = box
        return best if best and best["width"] > 200 else None

    def _at(self, x: float, y: float) -> tuple[float, float]:
        image = self._image()
        if image is None:
            raise UIDriverError(f"task {self.task}: no image on the page")
        return image["x"] + x * image["width"], image["y"] + y * image["height"]

    def move_box(self, center: tuple[float, float], by: tuple[float, float]) -> None:
        """Click the box whose centre is at ``center`` (normalized) to select it, then drag it by ``by``
        (fractions of the image's width and height) in small mouse steps."""
        x, y = self._at(*center)
        image = self._image()
        dx, dy = by[0] * image["width"], by[1] * image["height"]
        mouse = self.page.mouse
        mouse.click(x, y)
        self.page.wait_for_timeout(200)
        mouse.move(x, y)
        mouse.down()
        for step in range(1, 13):
            mouse.move(x + dx * step / 12, y + dy * step / 12)
            self.page.wait_for_timeout(15)
        mouse.up()
        self.page.wait_for_timeout(200)
        self.shot("moved")

    def delete_box(self, center: tuple[float, float]) -> None:
        """Select the box whose centre is at ``center`` (normalized) and delete it (Backspace)."""
        self.page.mouse.click(*self._at(*center))
        self.page.wait_for_timeout(200)
        self.page.keyboard.press("Backspace")
        self.page.wait_for_timeout(200)
        self.shot("deleted")

    def submit(self) -> dict:
        """Press Submit; returns the annotation Label Studio stored (the answer to the page's POST)."""
        task = self.task
        with self.page.expect_response(
            lambda r: f"/api/tasks/{task}/annotations" in r.url and r.request.method == "POST",
            timeout=self.timeout * 1000,
        ) as answer:
            self.page.get_by_role("button", name="Submit").click()
        if answer.value.status != 201:
            raise UIDriverError(f"task {task}: Submit answered HTTP {answer.value.status}: {answer.value.text()[:300]}")
        self.shot("submitted")
        return answer.value.json()

    def _wait(self, condition, message: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not condition():
            if time.monotonic() > deadline:
                raise UIDriverError(f"{message} (waited {self.timeout:.0f} s)")
            self.page.wait_for_timeout(100)


@contextlib.contextmanager
def labeling_session(
    base_url: str,
    username: str,
    password: str,
    *,
    screenshot_dir: Path | str | None = None,
    timeout: float = 30.0,
) -> Iterator[LabelingPage]:
    """A headless Chromium logged in to Label Studio at ``base_url`` (its login form)."""
    base_url = base_url.rstrip("/")
    host = urlsplit(base_url).hostname
    shots = Path(screenshot_dir) if screenshot_dir is not None else None
    if shots is not None:
        shots.mkdir(parents=True, exist_ok=True)
    offline = f"--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE {host}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(), headless=True, args=[*CHROMIUM_ARGS, offline]
        )
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.set_default_timeout(timeout * 1000)
            page = context.new_page()
            ui = LabelingPage(page, base_url, shots, timeout)
            try:
                page.goto(f"{base_url}/user/login/", wait_until="domcontentloaded")
                page.fill("input[name=email]", username)
                page.fill("input[name=password]", password)
                with page.expect_navigation():
                    page.click("button[type=submit]")
                if "/user/login" in page.url:
                    raise UIDriverError(f"Label Studio at {base_url} refused the login of {username!r}")
                yield ui
            except (UIDriverError, PlaywrightError) as err:
                where = Path(shots or tempfile.mkdtemp(prefix="labelstudio-ui-")) / "failure.png"
                with contextlib.suppress(PlaywrightError):
                    page.screenshot(path=str(where))
                raise UIDriverError(f"Label Studio UI at {base_url}: {err}\nscreenshot: {where}") from err
        finally:
            browser.close()
