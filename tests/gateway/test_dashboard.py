"""The dashboard in a real browser (Playwright driving Debian's chromium, headless).

It loads, shows topics as they are published (without a reload: the page
listens to /v1/dashboard/stream), starts a shop order (examples.shop) from its
form and shows the request completed with its step timeline. A screenshot is
left in the test's temp dir.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from tests.pg_plugin import unavailable

from .conftest import LiveServer
from .test_shop import start_shop

CHROMIUM = "/usr/bin/chromium"

if not os.path.exists(CHROMIUM):  # (under TIDINGS_REQUIRE_SERVICES=1, as in CI: a failure)
    unavailable(f"{CHROMIUM} is missing: `make browser-deps` installs Debian's chromium")


@pytest.fixture
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu",
                                    "--disable-background-networking"])
        yield b
        b.close()


def test_dashboard_updates_live_and_starts_an_order(
    start_server: Callable[..., LiveServer], browser: object, tmp_path: Path
) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    server = start_shop(start_server)  # examples.shop:app, seeded
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

    page.goto(server.base_url + "/")
    expect(page.get_by_test_id("status")).to_have_text("live", timeout=10_000)

    with httpx.Client(base_url=server.base_url) as c:
        c.post("/v1/topics/orders.created/messages",
               json={"messages": [{"data": {"n": i}} for i in range(3)]})
        c.post("/v1/topics/payments.done/messages", json={"data": "paid"})
        c.get("/v1/subscriptions/billing/messages", params={"topic": "orders.*", "max": 1})

    row = page.locator('#topics tr:has(td[data-topic="orders.created"])')
    expect(row).to_be_visible(timeout=10_000)
    expect(row.locator("td").nth(1)).to_have_text("3")
    expect(page.locator('#topics td[data-topic="payments.done"]')).to_be_visible()
    expect(page.locator("#subscriptions tbody")).to_contain_text("billing")

    page.select_option("#order-saga", "create-order")
    page.fill("#order-data", '{"customer_id": "c-2", "product_id": "p-2", "quantity": 1}')
    page.click("#order-submit")
    result = page.get_by_test_id("order-result")
    expect(result).to_have_attribute("data-status", "completed", timeout=10_000)
    expect(page.locator("#requests tbody")).to_contain_text("completed", timeout=10_000)
    expect(page.locator("#saga-list tbody")).to_contain_text("approve ✓", timeout=10_000)

    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert errors == []
    page.close()


def test_dashboard_asks_for_the_token(start_server: Callable[..., LiveServer],
                                      browser: object) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    server = start_server(token="s3cret")
    page = browser.new_page()
    page.goto(server.base_url + "/")
    expect(page.locator("#token-box")).to_be_visible(timeout=10_000)
    page.fill("#token", "s3cret")
    page.click("#token-form button")
    expect(page.get_by_test_id("status")).to_have_text("live", timeout=10_000)
    page.close()


def test_dashboard_redrives_a_group_s_dead_letters(
    start_server: Callable[..., LiveServer], browser: object, tmp_path: Path
) -> None:
    from playwright.sync_api import Browser, expect

    import tidings

    assert isinstance(browser, Browser)
    server = start_server(token="s3cret")

    async def dead_letter(hub: tidings.Hub) -> None:
        await hub.publish("jobs.run", {"n": 1})
        async with await hub.subscribe("jobs.run", group="workers") as sub:
            [m] = await sub.fetch(1, wait=5)
            await m.term(reason="decode-error", wait=True)

    server.call(dead_letter)
    page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone
    page.goto(server.base_url + "/")
    page.fill("#token", "s3cret")
    page.click("#token-form button")
    row = page.locator("#dead-letters tbody tr", has_text="workers")
    expect(row).to_contain_text("1", timeout=10_000)
    page.screenshot(path=str(tmp_path / "dead-letters-phone.png"), full_page=True)
    row.get_by_role("button", name="redrive").click()
    expect(page.get_by_test_id("dlq-result")).to_have_text("moved 1 of workers back",
                                                         timeout=10_000)
    expect(row).to_contain_text("0", timeout=10_000)  # the next snapshot: none waiting
    expect(row.get_by_role("button")).to_have_count(0)

    async def delivered(hub: tidings.Hub) -> list[int]:
        async with await hub.subscribe("jobs.run", group="workers") as sub:
            return [m.attempt for m in await sub.fetch(10, wait=5)]

    assert server.call(delivered) == [1]  # back on its topic, from attempt 1
    page.close()
