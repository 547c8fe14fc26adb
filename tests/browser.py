"""Headless Chromium driven over the DevTools protocol, for the status page tests.

The browser is the system's ``chromium`` (never a downloaded build). It is
started with ``--remote-debugging-pipe``: protocol messages are JSON texts,
each ended by a NUL byte, written to its fd 3 and read from its fd 4. That
needs no WebSocket, no driver binary and no third-party library, and no
port another process could reach.

A missing binary skips the tests, except under CI (env ``CI`` set), where
it fails them: a CI run must not pass without the browser half of the suite.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import pytest

__all__ = ["Browser", "BrowserError", "Page", "find_chromium"]

CALL_TIMEOUT = 30.0
_TRAMPOLINE = (
    "import fcntl, os, sys\n"
    "ends = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:3]]\n"
    "os.dup2(ends[0], 3)\n"
    "os.dup2(ends[1], 4)\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)


class BrowserError(RuntimeError):
    """The browser answered a command with an error, or went away."""


def find_chromium() -> str:
    """Path of the chromium binary; skip (or fail under CI) when absent."""
    path = os.environ.get("CHROMIUM_BIN")
    for candidate in (path, "chromium", "chromium-browser", "/usr/bin/chromium"):
        if candidate and (found := shutil.which(candidate)):
            return found
    if os.environ.get("CI"):
        pytest.fail("chromium not found and CI is set (install Debian's chromium package)")
    pytest.skip("chromium not found (install Debian's chromium package)")


class Browser:
    """One headless browser process; :meth:`page` opens tabs in it."""

    def __init__(self) -> None:
        binary = find_chromium()
        self._profile = tempfile.mkdtemp(prefix="relay-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        args = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--remote-debugging-pipe", f"--user-data-dir={self._profile}",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions",
            "--disable-background-networking", "--disable-sync", "--disable-component-update",
            "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
            "--force-device-scale-factor=1", "about:blank",
        ]  # fmt: skip
        # A small Python trampoline puts the pipe ends on fds 3 and 4, then
        # execs chromium (no preexec_fn: the tests have threads running).
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _TRAMPOLINE,
                str(to_browser_r),
                str(from_browser_w),
                binary,
                *args,
            ],
            pass_fds=(to_browser_r, from_browser_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._lock = threading.Lock()
        self._next_id = 0
        self._waiting: dict[int, tuple[threading.Event, list[Any]]] = {}
        self._events: list[dict[str, Any]] = []
        self._events_changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="cdp-reader", daemon=True)
        self._reader.start()
        self.call("Browser.getVersion")

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from_browser, 1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "id" in message:
                    with self._lock:
                        waiter = self._waiting.pop(message["id"], None)
                    if waiter is not None:
                        waiter[1].append(message)
                        waiter[0].set()
                else:
                    if message.get("method") == "Page.javascriptDialogOpening":
                        # A dialog blocks the page: dismiss it at once (the
                        # event stays recorded, for tests that forbid dialogs).
                        self._send(
                            "Page.handleJavaScriptDialog",
                            message.get("sessionId"),
                            {"accept": False},
                        )
                    with self._events_changed:
                        self._events.append(message)
                        self._events_changed.notify_all()
        with self._lock:  # the browser is gone: wake every caller
            for event, box in self._waiting.values():
                box.append({"error": {"message": "browser exited"}})
                event.set()
            self._waiting.clear()

    def _send(
        self,
        method: str,
        session: str | None,
        params: dict[str, Any],
        waiter: tuple[threading.Event, list[Any]] | None = None,
    ) -> None:
        with self._lock:
            self._next_id += 1
            ident = self._next_id
            if waiter is not None:
                self._waiting[ident] = waiter
            message: dict[str, Any] = {"id": ident, "method": method, "params": params}
            if session is not None:
                message["sessionId"] = session
            try:
                os.write(self._to_browser, json.dumps(message).encode() + b"\0")
            except OSError as exc:
                self._waiting.pop(ident, None)
                raise BrowserError(f"{method}: browser gone ({exc})") from exc

    def call(self, method: str, session: str | None = None, **params: Any) -> Any:
        """Send one command and wait (bounded) for its result."""
        done = threading.Event()
        box: list[Any] = []
        self._send(method, session, params, (done, box))
        if not done.wait(CALL_TIMEOUT):
            raise BrowserError(f"{method}: no answer within {CALL_TIMEOUT} s")
        answer = box[0]
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error'].get('message')}")
        return answer.get("result", {})

    def events(self, method: str, session: str | None = None) -> list[dict[str, Any]]:
        """The params of every event of *method* seen so far (in a tab, if given)."""
        with self._events_changed:
            return [
                e.get("params", {})
                for e in self._events
                if e.get("method") == method and (session is None or e.get("sessionId") == session)
            ]

    def page(self, width: int = 1280, height: int = 900) -> Page:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        return Page(self, session, target, width, height)

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self.call("Browser.close")
            except BrowserError:
                pass
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        os.close(self._to_browser)
        self._reader.join(10)
        os.close(self._from_browser)
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Page:
    """One tab: navigate, evaluate script, type and press keys, take screenshots."""

    def __init__(
        self, browser: Browser, session: str, target: str, width: int, height: int
    ) -> None:
        self.browser = browser
        self.session = session
        self.target = target
        for domain in ("Page", "Runtime", "Network"):
            self.call(f"{domain}.enable")
        self.set_viewport(width, height)

    def call(self, method: str, **params: Any) -> Any:
        return self.browser.call(method, self.session, **params)

    def events(self, method: str) -> list[dict[str, Any]]:
        return self.browser.events(method, self.session)

    def set_viewport(self, width: int, height: int) -> None:
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width, height=height, deviceScaleFactor=1, mobile=width < 600,
        )  # fmt: skip

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && location.href === " + json.dumps(url))

    def evaluate(self, expression: str) -> Any:
        """The JSON value of *expression* in the page (promises awaited)."""
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"script failed: {text}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        """Poll *expression* until it is truthy (bounded); returns its value."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except BrowserError:
                value = None  # e.g. a navigation replaced the context mid-call
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"not true within {timeout} s: {expression} (last: {value!r})")

    def press(
        self, key: str, code: str | None = None, key_code: int = 0, shift: bool = False
    ) -> None:
        """One key pressed and released, as a keyboard user would."""
        modifiers = 8 if shift else 0
        text = {"Enter": "\r", "Space": " "}.get(key, key if len(key) == 1 else "")
        common: dict[str, Any] = {
            "key": " " if key == "Space" else key, "code": code or key,
            "windowsVirtualKeyCode": key_code, "modifiers": modifiers,
        }  # fmt: skip
        down = dict(common, type="keyDown" if text else "rawKeyDown")
        if text:
            down["text"] = text
        self.call("Input.dispatchKeyEvent", **down)
        self.call("Input.dispatchKeyEvent", **dict(common, type="keyUp"))

    def tab(self, shift: bool = False) -> None:
        self.press("Tab", key_code=9, shift=shift)

    def enter(self) -> None:
        self.press("Enter", key_code=13)

    def type_text(self, text: str) -> None:
        self.call("Input.insertText", text=text)

    def focused(self) -> str:
        """What has the focus: its id, else its text (to find it by keyboard)."""
        return str(self.evaluate("document.activeElement.id || document.activeElement.textContent"))

    def focus_by_tab(self, element_id: str, limit: int = 80) -> None:
        """Tab through the page until *element_id* has the focus (bounded)."""
        for _ in range(limit):
            if self.evaluate("document.activeElement.id") == element_id:
                return
            self.tab()
        raise AssertionError(f"#{element_id} not reachable with Tab in {limit} presses")

    def screenshot(self, path: str, full_page: bool = True) -> None:
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": full_page}
        if full_page:
            size = self.evaluate(
                "[document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
            )
            params["clip"] = {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1}
        data = self.call("Page.captureScreenshot", **params)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self) -> None:
        self.browser.call("Target.closeTarget", targetId=self.target)
