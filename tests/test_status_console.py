"""The status page's key console in headless Chromium, against the real admin
API of virtual keys: a key created in the page works with the OpenAI SDK,
stops working once rotated (old secret) and revoked (new secret), its spend
is shown against its budget, a key name made of markup stays text, and the
admin key never leaves the tab's memory."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from relay.testing.fake_upstream import ThreadedFakeUpstream
from tests.browser import Browser, Page
from tests.support import RelayThread, make_config
from tests.test_status_page import artifacts_dir, open_page, usd
from tests.test_usage_e2e import MODELS

ADMIN = "admin-key-of-the-console-test-0123456789"
MARKUP = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def upstream() -> Iterator[ThreadedFakeUpstream]:
    with ThreadedFakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with Browser() as chromium:
        yield chromium


def admin_get(url: str, path: str = "") -> Any:
    request = urllib.request.Request(
        url + "/relay/admin/keys" + path, headers={"Authorization": f"Bearer {ADMIN}"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def admin_wait(url: str, done: Any, timeout: float = 10.0) -> Any:
    """The key list once ``done(list)`` holds: spend is settled shortly after
    an answer (within the contract's second), not at once."""
    deadline = time.monotonic() + timeout
    while True:
        listed = admin_get(url)
        if done(listed) or time.monotonic() > deadline:
            return listed
        time.sleep(0.05)


def text_of(page: Page, element_id: str) -> str:
    return str(page.evaluate(f"document.getElementById({json.dumps(element_id)}).textContent"))


def focus(page: Page, selector: str) -> None:
    """Put the keyboard focus on one control (as Tab would, without counting presses)."""
    assert page.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                         " if (!e) return false; e.focus(); return document.activeElement === e; })()")


def type_into(page: Page, element_id: str, text: str) -> None:
    focus(page, "#" + element_id)
    page.type_text(text)


def key_rows(page: Page) -> dict[str, list[str]]:
    rows = page.evaluate(
        "Array.from(document.querySelectorAll('#vkeys-table tbody tr'),"
        " (tr) => Array.from(tr.cells, (td) => td.textContent))"
    )
    return {row[1]: row for row in rows if len(row) > 1}


def create_in_console(page: Page, name: str, budget: str = "", period: str = "") -> str:
    """Fill the create form by keyboard and submit it with Enter; the secret shown."""
    page.evaluate("document.getElementById('secret-box').hidden = true")
    type_into(page, "new-name", name)
    if budget:
        type_into(page, "new-budget", budget)
    if period:
        page.evaluate(f"document.getElementById('new-period').value = {json.dumps(period)}")
    focus(page, "#new-name")
    page.enter()
    page.wait_for("!document.getElementById('secret-box').hidden")
    secret = str(page.evaluate("document.getElementById('secret-value').value"))
    assert secret.startswith("rk-") and len(secret) >= 35
    return secret


def sdk(url: str, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=secret, max_retries=0, timeout=20)


def ask(client: openai.OpenAI, content: str = "console") -> str:
    answer = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": content}]
    )
    return answer.choices[0].message.content or ""


def test_console_creates_a_key_that_works_until_revoked(browser, upstream, tmp_path):
    config = make_config(
        upstream.url,
        models=MODELS,
        keys={"enabled": True, "admin_key": ADMIN, "path": str(tmp_path / "keys.db")},
        server={"shutdown_timeout": 1},
    )
    with RelayThread(config) as relay:
        page = open_page(browser, relay.url)
        browser.call(
            "Browser.grantPermissions", origin=relay.url,
            permissions=["clipboardReadWrite", "clipboardSanitizedWrite"],
        )  # fmt: skip
        # A wrong admin key is refused in words; the console stays closed.
        page.focus_by_tab("admin-key")
        page.type_text("not-" + ADMIN)
        page.enter()
        page.wait_for("document.getElementById('console-msg').textContent.includes('refused')")
        assert page.evaluate("document.getElementById('console').hidden") is True

        page.focus_by_tab("admin-key")
        page.type_text(ADMIN)
        page.enter()
        page.wait_for("!document.getElementById('console').hidden")
        assert text_of(page, "console-msg") == "0 key(s)."

        # Create by keyboard; the secret is shown once, with a copy button.
        secret = create_in_console(page, "support-bot", budget="1", period="daily")
        assert page.evaluate("document.activeElement.id") == "secret-copy"
        page.enter()
        page.wait_for("document.getElementById('copy-msg').textContent.length > 0")
        assert text_of(page, "copy-msg") == "Copied to the clipboard."
        assert page.evaluate("navigator.clipboard.readText()") == secret

        # The key works with the official SDK; its spend shows against its budget.
        assert ask(sdk(relay.url, secret))
        (listed,) = admin_wait(relay.url, lambda keys: keys[0]["requests"] == 1)
        assert listed["name"] == "support-bot" and listed["requests"] == 1
        assert "secret" not in listed
        page.wait_for(
            "Array.from(document.querySelectorAll('#vkeys-table tbody tr')).some((tr) =>"
            " tr.cells.length > 4 && tr.cells[4].textContent === '1')"
        )
        row = key_rows(page)[listed["id"]]
        assert row[0] == "support-bot" and row[2] == "active"
        spend = listed["spend_usd"]
        assert spend > 0
        assert row[3] == f" {usd(spend)} of {usd(1)} daily ({100 * spend:.1f}%)"
        assert row[5] == str(listed["tokens"]["prompt"] + listed["tokens"]["completion"])

        # Rotate: a new secret is shown; the old one stops at once.
        focus(page, f"button[data-action=rotate][data-id='{listed['id']}']")
        page.enter()
        page.wait_for(f"document.getElementById('secret-value').value !== {json.dumps(secret)}"
                      " && !document.getElementById('secret-box').hidden")
        rotated = str(page.evaluate("document.getElementById('secret-value').value"))
        assert rotated.startswith("rk-")
        with pytest.raises(openai.AuthenticationError):
            ask(sdk(relay.url, secret), "old secret")
        assert ask(sdk(relay.url, rotated), "new secret")

        # Revoke: the first press asks to confirm, the second revokes.
        selector = f"button[data-action=revoke][data-id='{listed['id']}']"
        focus(page, selector)
        page.enter()
        assert page.evaluate(f"document.querySelector({json.dumps(selector)}).textContent") == (
            "Confirm revoke"
        )
        page.enter()
        page.wait_for("document.getElementById('console-msg').textContent === 'Revoked support-bot.'")
        page.wait_for(
            "Array.from(document.querySelectorAll('#vkeys-table tbody tr'))"
            ".some((tr) => tr.cells.length > 2 && tr.cells[2].textContent === 'revoked')"
        )
        with pytest.raises(openai.AuthenticationError):
            ask(sdk(relay.url, rotated), "after revoke")
        assert admin_get(relay.url, "/" + listed["id"])["revoked"] is True

        # A name made of markup is shown as text: no element, no script, no dialog.
        hostile = create_in_console(page, MARKUP)
        assert ask(sdk(relay.url, hostile), "markup")
        page.wait_for(
            "Array.from(document.querySelectorAll('#keys-table tbody td:first-child'),"
            f" (td) => td.textContent).includes({json.dumps(MARKUP)})"
        )
        names = [row[0] for row in key_rows(page).values()]
        assert MARKUP in names
        assert page.evaluate("document.querySelectorAll('img, [onerror]').length") == 0
        assert MARKUP in page.evaluate(  # the chart's label (shortened) has it as its title
            "Array.from(document.querySelectorAll('#keys-chart svg g > title'), (t) => t.textContent)"
        )
        assert page.events("Page.javascriptDialogOpening") == []
        assert page.events("Runtime.exceptionThrown") == []

        # The admin key lived in the script only: not in the field, the
        # document, storage, cookies or the address; sent only to the admin API.
        assert page.evaluate("document.getElementById('admin-key').value") == ""
        assert ADMIN not in page.evaluate("document.documentElement.outerHTML")
        assert page.evaluate("document.cookie + localStorage.length + sessionStorage.length") == "00"
        assert ADMIN not in page.evaluate("location.href")
        sent = page.events("Network.requestWillBeSent")
        for event in sent:
            request = event["request"]
            assert request["url"].startswith(relay.url + "/relay/"), request["url"]
            carries = ADMIN in json.dumps(request.get("headers", {}))
            assert carries == request["url"].startswith(relay.url + "/relay/admin/keys")
        assert any(e["request"]["method"] == "DELETE" for e in sent)

        # A key whose budget cannot cover a request: refused before it goes
        # upstream, and counted on the page as a budget rejection.
        tiny = create_in_console(page, "tiny-budget", budget="0.000001")
        with pytest.raises(openai.PermissionDeniedError) as refused:
            ask(sdk(relay.url, tiny), "over budget")
        assert refused.value.code == "budget_exceeded"
        page.wait_for("document.getElementById('budget-rejected').textContent === '1'")
        status = json.loads(urllib.request.urlopen(relay.url + "/relay/status", timeout=10).read())
        assert status["keys"]["by_reason"]["budget"] == 1

        for width in (1280, 390):
            page.set_viewport(width, 900)
            before = page.evaluate("Number(document.body.dataset.updates)")
            page.wait_for(f"Number(document.body.dataset.updates) > {before}")
            assert page.evaluate("document.documentElement.scrollWidth") <= width
            page.screenshot(os.path.join(artifacts_dir(), f"status-console-{width}.png"))

        # "Forget admin key" closes the console; nothing more goes to the admin API.
        focus(page, "#admin-forget")
        page.enter()
        assert page.evaluate("document.getElementById('console').hidden") is True
        count = len(page.events("Network.requestWillBeSent"))
        before = page.evaluate("Number(document.body.dataset.updates)")
        page.wait_for(f"Number(document.body.dataset.updates) > {before}")
        later = page.events("Network.requestWillBeSent")[count:]
        assert later and not any("/relay/admin/" in e["request"]["url"] for e in later)
        page.close()
