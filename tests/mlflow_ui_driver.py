"""Change a registered model version's aliases through the MLflow UI itself, the way a person would.

Real clicks and typing in headless Chromium (Playwright driving the system ``chromium``; Playwright's
own browser downloads are never used) against a running ``mlflow server``; no MLflow API is called
here. On the version page (``#/models/<name>/versions/<n>``) the "Aliases" field has a button, "Add"
when the version has none and a pencil otherwise, that opens the "Add/Edit alias for model version N"
modal: a tag select where typing an alias and pressing Enter adds a tag and each tag has an "x".
"Save aliases" stores the tags; the driver then waits until the page shows the change.

Taking an alias another version holds is what the modal does on its own: it warns 'The "production"
alias is also being used on version 1. Adding it to this version will remove it from version 1.' and
the save moves it. :func:`set_alias_in_ui` returns the modal's notices so a test can show that.

Written against MLflow 3.17's UI. Nothing leaves the machine: Chromium resolves no host name but the
server's, and every page request is checked to stay on the server's origin. A screenshot is saved on
failure (its path is in the error), and after each step when ``screenshot_dir`` is given.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlsplit

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from playwright.sync_api import sync_playwright

# The modal lower-cases aliases and drops characters other than letters, digits, "_" and "-"
# (ModelVersionAliasSelect); refuse those aliases rather than let the UI save a different one.
ALIAS = re.compile(r"[a-z0-9_-]{1,255}")

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-domain-reliability",
]

EDIT_BUTTON = 'button[title="Add aliases"], button[title="Edit aliases"]'
TAG = "[role=status][title]"  # an alias tag (its title is the alias), on the page and in the modal
TITLES = "tags => tags.map(tag => tag.title)"  # read in one go: tags come and go while the page re-renders


class UIDriverError(AssertionError):
    """The UI did not do what was asked; the message says which step and where the screenshot is."""


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise UIDriverError("headless Chromium is needed to drive the MLflow UI: `make chromium` (Debian chromium)")
    return found


def set_alias_in_ui(
    base_url: str,
    model_name: str,
    version: str | int,
    alias: str,
    *,
    screenshot_dir: Path | str | None = None,
    username: str | None = None,
    password: str | None = None,
    timeout: float = 30.0,
) -> list[str]:
    """Give ``version`` of ``model_name`` the alias ``alias`` in the MLflow UI, taking it from any other version.

    Returns the notices the alias editor showed before saving (e.g. that the alias moves from another
    version) once the version page shows ``@ alias``. Raises :class:`UIDriverError` (an
    AssertionError, with a screenshot path) if it never does, or if the version already holds it.
    """
    _check_alias(alias)
    with _version_page(base_url, model_name, version, screenshot_dir, username, password, timeout) as ui:
        if alias in ui.aliases():
            ui.fail(f"version {version} of {model_name!r} already holds the alias {alias!r}: nothing to change")
        ui.open_editor()
        field = ui.modal.locator("input[role=combobox]")
        field.click()
        field.press_sequentially(alias, delay=20)
        field.press("Enter")
        ui.wait(
            lambda: alias in ui.draft_aliases(),
            f"no {alias!r} tag in the alias editor after typing {alias!r} and pressing Enter",
        )
        ui.shot("typed")
        notices = ui.notices()
        ui.save(lambda: alias in ui.aliases(), f"the version page does not show @ {alias} after saving")
        return notices


def remove_alias_in_ui(
    base_url: str,
    model_name: str,
    version: str | int,
    alias: str,
    *,
    screenshot_dir: Path | str | None = None,
    username: str | None = None,
    password: str | None = None,
    timeout: float = 30.0,
) -> None:
    """Take the alias ``alias`` off ``version`` of ``model_name`` in the MLflow UI (the "x" on its tag in the editor).

    Returns once the version page no longer shows it. Raises :class:`UIDriverError` if it still
    does, or if the version does not hold the alias.
    """
    _check_alias(alias)
    with _version_page(base_url, model_name, version, screenshot_dir, username, password, timeout) as ui:
        held = ui.aliases()
        if alias not in held:
            ui.fail(f"version {version} of {model_name!r} does not hold the alias {alias!r} (it holds {held})")
        ui.open_editor()
        ui.modal.locator(f'[role=status][title="{alias}"] button').click()
        ui.wait(lambda: alias not in ui.draft_aliases(), f"the {alias!r} tag is still in the alias editor after its x")
        ui.shot("removed")
        ui.save(lambda: alias not in ui.aliases(), f"the version page still shows @ {alias} after saving")


def _check_alias(alias: str) -> None:
    if not ALIAS.fullmatch(alias):
        raise ValueError(f"{alias!r}: the MLflow alias editor keeps only lower-case letters, digits, '_' and '-'")


class _VersionPage:
    """One open version page: its "Aliases" field and, once opened, the alias editor modal."""

    def __init__(self, page, version: str, screenshot_dir: Path | None, timeout: float):
        self.page = page
        self.screenshot_dir = screenshot_dir
        self.timeout = timeout
        self.steps = 0
        # the version's details are descriptions items; the one labelled "Aliases"
        label = page.locator('[data-testid="descriptions-item-label"]', has_text=re.compile(r"^\s*Aliases\s*$"))
        self.field = page.locator('[data-testid="descriptions-item"]').filter(has=label)
        self.modal = page.get_by_role("dialog").filter(has_text=f"Add/Edit alias for model version {version}")

    def shot(self, step: str) -> None:
        if self.screenshot_dir is not None:
            self.steps += 1
            self.page.screenshot(path=str(self.screenshot_dir / f"{self.steps:02d}-{step}.png"))

    def fail(self, message: str) -> None:
        raise UIDriverError(message)

    def aliases(self) -> list[str]:
        """The aliases the page shows on this version."""
        return self.field.locator(TAG).evaluate_all(TITLES)

    def draft_aliases(self) -> list[str]:
        """The alias tags in the editor (what "Save aliases" would store)."""
        return self.modal.locator(TAG).evaluate_all(TITLES)

    def notices(self) -> list[str]:
        return [" ".join(text.split()) for text in self.modal.get_by_role("alert").all_inner_texts() if text.strip()]

    def wait(self, condition: Callable[[], bool], message: str, timeout: float | None = None) -> bool:
        """Poll ``condition`` until it holds; after ``timeout`` return False, or fail with ``message`` if none given."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            try:
                if condition():
                    return True
            except Exception:  # an element re-rendering under us: look again
                pass
            if time.monotonic() > deadline:
                if timeout is not None:
                    return False
                self.fail(f"{message} (waited {limit:.0f} s)")
            self.page.wait_for_timeout(100)

    def open_editor(self) -> None:
        # The button does nothing until the registered model (with every version's aliases) is in the
        # page's store: press it again if the modal does not open (the page waited for that model already).
        button = self.field.locator(EDIT_BUTTON)
        deadline = time.monotonic() + self.timeout
        while not self.modal.is_visible():
            if time.monotonic() > deadline:
                self.fail("the alias editor did not open after pressing the Aliases field's Add/pencil button")
            with contextlib.suppress(PlaywrightTimeoutError):  # covered by the modal opening after all
                button.click(timeout=3000)
            self.wait(self.modal.is_visible, "", timeout=3)
        self.modal.locator("input[role=combobox]").wait_for(state="visible")
        self.shot("editor")

    def save(self, done: Callable[[], bool], message: str) -> None:
        button = self.modal.get_by_role("button", name="Save aliases")
        self.wait(button.is_enabled, "the alias editor's 'Save aliases' button stays disabled (nothing changed?)")
        button.click()
        if not self.wait(lambda: not self.modal.is_visible(), "", timeout=self.timeout):
            self.fail(f"the alias editor did not close after 'Save aliases'; it shows {self.notices()}")
        self.wait(done, message)
        self.shot("saved")


@contextmanager
def _version_page(
    base_url: str,
    model_name: str,
    version: str | int,
    screenshot_dir: Path | str | None,
    username: str | None,
    password: str | None,
    timeout: float,
) -> Iterator[_VersionPage]:
    base_url = base_url.rstrip("/")
    parts = urlsplit(base_url)
    origin = f"{parts.scheme}://{parts.netloc}"
    shots = Path(screenshot_dir) if screenshot_dir is not None else None
    if shots is not None:
        shots.mkdir(parents=True, exist_ok=True)
    url = f"{base_url}/#/models/{quote(model_name, safe='')}/versions/{version}"
    credentials = {"username": username, "password": password or ""} if username is not None else None
    elsewhere: list[str] = []
    # Chromium itself looks up accounts.google.com and content-autofill.googleapis.com: it resolves
    # no host name but the server's, so not even a DNS query leaves the machine.
    offline = f"--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE {parts.hostname}"

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(), headless=True, args=[*CHROMIUM_ARGS, offline]
        )
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000}, http_credentials=credentials)
            context.set_default_timeout(timeout * 1000)
            context.on("request", lambda r: r.url.startswith((origin, "data:", "blob:")) or elsewhere.append(r.url))
            page = context.new_page()
            ui = _VersionPage(page, str(version), shots, timeout)
            try:
                try:
                    with page.expect_response(lambda r: "/registered-models/get?" in r.url):
                        response = page.goto(url, wait_until="domcontentloaded")
                except PlaywrightError as err:  # headless Chromium has no login prompt to show
                    if "ERR_INVALID_AUTH_CREDENTIALS" not in str(err):
                        raise
                    ui.fail("the server asks for a login (basic auth): pass username= and password=")
                if response is not None and response.status == 401:
                    ui.fail(f"401 Unauthorized: the server refused the login of {username!r}")
                not_found = page.get_by_text("Page Not Found", exact=True)
                ui.field.or_(not_found).first.wait_for(state="visible")
                if not_found.is_visible():
                    why = page.get_by_text(re.compile(r"does not exist")).all_inner_texts()
                    ui.fail(f"the UI shows 'Page Not Found' {why}")
                ui.field.locator(EDIT_BUTTON).wait_for(state="visible")
                ui.shot("page")
                yield ui
            except (UIDriverError, PlaywrightError) as err:
                where = _failure_shot(page, shots)
                raise UIDriverError(f"MLflow UI at {url}: {err}" + (f"\nscreenshot: {where}" if where else "")) from err
            if elsewhere:
                raise UIDriverError(f"the MLflow UI requested addresses off {origin}: {sorted(set(elsewhere))}")
        finally:
            browser.close()


def _failure_shot(page, shots: Path | None) -> Path | None:
    folder = shots or Path(tempfile.mkdtemp(prefix="mlflow-ui-driver-"))
    path = folder / f"failure-{time.strftime('%H%M%S')}-{time.monotonic_ns() % 10**6:06d}.png"
    try:
        page.screenshot(path=str(path))
    except Exception:  # the page may be gone; the error message is what counts then
        return None
    return path
