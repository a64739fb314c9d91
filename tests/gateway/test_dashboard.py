"""The dashboard in a real browser (Playwright driving Debian's chromium, headless).

It loads, shows topics as they are published (without a reload: the page
listens to /v1/dashboard/stream), starts a shop order (examples.shop) from its
form and shows the request completed with its step timeline. A screenshot is
left in the test's temp dir.
"""

from __future__ import annotations

import os
import re
import time
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


@pytest.fixture(scope="module")  # one chromium for the module; each test its own page
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


# the pages: drill in from the overview ----------------------------------------------------
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}


def _page(browser: object, server: LiveServer, viewport: dict[str, int] = DESKTOP,
          token: str | None = None) -> tuple[object, list[str]]:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    page = browser.new_page(viewport=viewport)  # type: ignore[arg-type]
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # (the browser logs the first probe's 401 when a token is needed: that one is expected)
    page.on("console", lambda m: errors.append(m.text)
            if m.type == "error" and "status of 401" not in m.text else None)
    page.goto(server.base_url + "/")
    if token is not None:
        page.fill("#token", token)
        page.click("#token-form button")
    expect(page.get_by_test_id("status")).to_have_text("live", timeout=10_000)
    return page, errors


def _shots(page: object, tmp_path: Path, name: str) -> None:
    """The page at a phone's and a desktop's width (kept with the test's artifacts)."""
    from playwright.sync_api import Page

    assert isinstance(page, Page)
    for label, size in (("phone", PHONE), ("desktop", DESKTOP)):
        page.set_viewport_size(size)  # type: ignore[arg-type]
        page.wait_for_timeout(300)  # (the charts redraw at the new width)
        shot = tmp_path / f"{name}-{label}.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 5_000


def test_an_order_s_saga_page_shows_its_timeline(
    start_server: Callable[..., LiveServer], browser: object, tmp_path: Path
) -> None:
    from playwright.sync_api import Page, expect

    server = start_shop(start_server)
    page, errors = _page(browser, server)
    assert isinstance(page, Page)
    page.select_option("#order-saga", "create-order")
    page.fill("#order-data", '{"customer_id": "c-1", "product_id": "p-1", "quantity": 1}')
    page.click("#order-submit")
    result = page.get_by_test_id("order-result")
    expect(result).to_have_attribute("data-status", "completed", timeout=10_000)
    saga_id = result.get_attribute("data-request-id")
    assert saga_id
    # the newest saga is listed first, the counts include it, and its id is a link
    first = page.locator("#saga-list tbody tr").first
    expect(first).to_contain_text(saga_id, timeout=10_000)
    expect(page.locator('#saga-counts [data-status="completed"]')).to_have_text(
        "completed: 1", timeout=10_000)
    first.get_by_role("link", name=saga_id).click()

    expect(page).to_have_url(f"{server.base_url}/#/saga/create-order/{saga_id}")
    expect(page.get_by_test_id("saga-status")).to_have_text("completed", timeout=10_000)
    steps = page.locator("[data-testid=saga-steps] tr.step-row")
    expect(steps).to_have_count(4)
    for i, name in enumerate(["create_order", "reserve_credit", "reserve_stock", "approve"]):
        expect(steps.nth(i)).to_contain_text(name)
        expect(steps.nth(i)).to_contain_text("completed")
        expect(steps.nth(i).locator("td.duration")).to_have_text(re.compile(r"\d+(\.\d+)? m?s"))
    expect(page.locator("[data-testid=saga-gantt] rect.attempt")).to_have_count(4)
    expect(page.get_by_test_id("saga-cancel")).to_have_count(0)  # it ended: nothing to cancel
    # the command and the reply of a step
    page.locator("details.attempt summary").first.click()
    expect(page.locator("details.attempt").first).to_contain_text('"customer_id": "c-1"')
    expect(page.locator("details.attempt").first).to_contain_text('"total"')
    _shots(page, tmp_path, "saga")
    assert errors == []


def test_a_dead_letter_is_redriven_from_its_page_and_delivered_again(
    start_server: Callable[..., LiveServer], browser: object, tmp_path: Path
) -> None:
    from playwright.sync_api import Page, expect

    import tidings

    server = start_server(token="s3cret")

    async def dead_letter(hub: tidings.Hub) -> None:
        await hub.publish("jobs.run", {"n": 1}, id="job-1")
        async with await hub.subscribe("jobs.run", group="workers") as sub:
            [m] = await sub.fetch(1, wait=5)
            await m.term(reason="decode-error", wait=True)

    server.call(dead_letter)
    page, errors = _page(browser, server, PHONE, token="s3cret")
    assert isinstance(page, Page)
    row = page.locator("#dead-letters tbody tr", has_text="workers")
    expect(row).to_contain_text("1", timeout=10_000)
    row.get_by_role("link", name="workers").click()

    expect(page.get_by_test_id("dlq-info")).to_have_text("1 waiting", timeout=10_000)
    letter = page.locator("[data-testid=dlq-messages] article.dead")
    expect(letter).to_have_count(1)
    expect(letter).to_contain_text("jobs.run")
    expect(letter).to_contain_text("decode-error")
    expect(letter).to_contain_text('"n": 1')
    expect(letter).to_have_attribute("data-state", "waiting")
    _shots(page, tmp_path, "dead-letters")
    page.get_by_test_id("redrive-all").click()
    expect(page.get_by_test_id("dlq-page-result")).to_have_text("moved 1 of workers back",
                                                                timeout=10_000)
    expect(letter).to_have_attribute("data-state", "redriven", timeout=10_000)
    expect(page.get_by_test_id("dlq-info")).to_have_text("0 waiting", timeout=10_000)

    async def delivered(hub: tidings.Hub) -> list[tuple[int, object]]:
        async with await hub.subscribe("jobs.run", group="workers") as sub:
            got = await sub.fetch(10, wait=5)
            for m in got:
                await m.ack()
            return [(m.attempt, m.decode()) for m in got]

    assert server.call(delivered) == [(1, {"n": 1})]  # back on its topic, from attempt 1
    # delivered: the subscription has nothing left to take
    subs = page.locator("[data-testid=dlq-subscriptions] tbody tr", has_text="jobs.run")
    expect(subs.locator("td").nth(1)).to_have_text("0", timeout=10_000)
    assert errors == []


def test_a_redrive_without_the_token_fails_clearly(
    start_server: Callable[..., LiveServer], browser: object
) -> None:
    from playwright.sync_api import Page, expect

    import tidings

    server = start_server(token="s3cret")

    async def dead_letter(hub: tidings.Hub) -> None:
        await hub.publish("jobs.run", {"n": 1})
        async with await hub.subscribe("jobs.run", group="workers") as sub:
            [m] = await sub.fetch(1, wait=5)
            await m.term(wait=True)

    server.call(dead_letter)
    page, _ = _page(browser, server, token="s3cret")
    assert isinstance(page, Page)
    page.goto(server.base_url + "/#/dlq/workers")
    expect(page.locator("[data-testid=dlq-messages] article.dead")).to_have_count(1,
                                                                                 timeout=10_000)
    page.evaluate("sessionStorage.removeItem('tidings-token')")  # the token is gone
    page.get_by_test_id("redrive-all").click()
    expect(page.get_by_test_id("dlq-page-result")).to_contain_text(
        "this server needs a token", timeout=10_000)
    expect(page.locator("#token-box")).to_be_visible()
    assert server.call(lambda hub: hub.dead_letters("workers"))  # nothing moved


def test_a_topic_page_pages_back_and_replays(
    start_server: Callable[..., LiveServer], browser: object, tmp_path: Path
) -> None:
    from playwright.sync_api import Page, expect

    server = start_server()
    with server.client() as c:
        c.post("/v1/topics/orders.created/messages",
               json={"messages": [{"data": {"n": i}, "key": f"o-{i}"} for i in range(1, 46)]})
        c.get("/v1/subscriptions/billing/messages", params={"topic": "orders.*", "max": 5})
    page, errors = _page(browser, server)
    assert isinstance(page, Page)
    page.locator('#topics td[data-topic="orders.created"] a').click()
    expect(page).to_have_url(f"{server.base_url}/#/topic/orders.created")
    messages = page.locator("[data-testid=topic-messages] article.msg")
    expect(messages).to_have_count(20, timeout=10_000)
    expect(messages.first).to_have_attribute("data-position", "45")
    expect(messages.first).to_contain_text('"n": 45')
    expect(page.get_by_test_id("topic-subscriptions")).to_contain_text("billing")
    page.get_by_test_id("topic-older").click()
    expect(messages.first).to_have_attribute("data-position", "25")
    page.get_by_test_id("topic-older").click()
    expect(messages).to_have_count(5)
    expect(messages.last).to_have_attribute("data-position", "1")
    expect(page.get_by_test_id("topic-older")).to_be_disabled()
    page.get_by_test_id("topic-newer").click()
    expect(messages.first).to_have_attribute("data-position", "25")
    # replay from a position: oldest first
    page.fill("[data-testid=replay-position]", "10")
    page.get_by_role("button", name="replay").click()
    expect(messages.first).to_have_attribute("data-position", "10")
    expect(messages.nth(1)).to_have_attribute("data-position", "11")
    # live: a new message shows on the newest page without a reload
    page.get_by_role("button", name="newest").click()
    with server.client() as c:
        c.post("/v1/topics/orders.created/messages", json={"data": {"n": 46}})
    expect(messages.first).to_have_attribute("data-position", "46", timeout=10_000)
    expect(page.locator("[data-testid=topic-chart] svg polyline")).to_have_count(2,
                                                                                 timeout=10_000)
    _shots(page, tmp_path, "topic")
    assert errors == []


def test_an_event_stream_page_shows_the_state_at_an_earlier_version(
    start_server: Callable[..., LiveServer], browser: object, tmp_path: Path
) -> None:
    from playwright.sync_api import Page, expect

    server = start_shop(start_server)
    with server.client() as c:
        r = c.post("/v1/commands/create-order",
                   json={"customer_id": "c-1", "product_id": "p-1", "quantity": 1})
        c.get(r.headers["location"], params={"wait": 10})
    page, errors = _page(browser, server)
    assert isinstance(page, Page)
    page.fill("#stream-id", "c-1")
    page.click("#stream-form button")
    info = page.get_by_test_id("stream-info")
    expect(info).to_have_text("version 2 of 2 · aggregate Customer", timeout=10_000)
    state = page.get_by_test_id("stream-state")
    expect(state).to_contain_text('"reservations"')
    expect(state).to_contain_text(r.json()["request_id"])  # the order's reservation
    page.locator('[data-testid=stream-events] article[data-version="1"] a').click()
    expect(info).to_have_text("version 1 of 2 · aggregate Customer")
    expect(state).to_contain_text('"reservations": {}')
    expect(page.locator("[data-testid=stream-events] article")).to_have_count(1)
    _shots(page, tmp_path, "stream")
    assert errors == []


def test_the_charts_draw_the_last_minutes(
    start_server: Callable[..., LiveServer], browser: object, tmp_path: Path
) -> None:
    from playwright.sync_api import Page, expect

    server = start_shop(start_server)
    with server.client() as c:
        c.get("/v1/dashboard")  # a sample before (a loaded machine samples less often)
        for q in (1, 1, 10_000):  # two complete, one compensates
            r = c.post("/v1/commands/create-order",
                       json={"customer_id": "c-1", "product_id": "p-1", "quantity": q})
            c.get(r.headers["location"], params={"wait": 10})
        c.post("/v1/topics/orders.created/messages",
               json={"messages": [{"data": {"n": i}} for i in range(20)]})
        c.get("/v1/subscriptions/billing/messages", params={"topic": "orders.*", "max": 1})
        # and a sample after it all: ask until there is one
        deadline = time.monotonic() + 30
        while True:
            points = c.get("/v1/dashboard").json()["history"]
            if any(p.get("lag") for p in points) and any(p.get("delivered") for p in points):
                break
            assert time.monotonic() < deadline, "no sample after the deliveries"
            time.sleep(0.2)
    page, errors = _page(browser, server)  # a page opened afterwards sees the minutes before
    assert isinstance(page, Page)
    line = page.locator("[data-testid=chart-published] svg polyline")
    expect(line.first).to_be_visible(timeout=10_000)
    assert len(line.first.get_attribute("points").split()) >= 2  # type: ignore[union-attr]
    expect(page.locator('[data-testid=chart-published] polyline[data-series="orders.created"]')
           ).to_have_count(1)
    expect(page.locator("[data-testid=chart-lag] svg polyline")).not_to_have_count(0)
    expect(page.locator("[data-testid=chart-delivered] svg polyline")).not_to_have_count(0)
    expect(page.locator("[data-testid=chart-outcomes] svg rect")).not_to_have_count(0)
    expect(page.locator("[data-testid=chart-latency] svg rect")).not_to_have_count(0)
    expect(page.locator("[data-testid=chart-outcomes]")).to_contain_text("compensated")
    _shots(page, tmp_path, "overview")
    assert errors == []


def test_a_running_saga_is_cancelled_from_its_page_with_the_token(
    start_server: Callable[..., LiveServer], browser: object
) -> None:
    from playwright.sync_api import Page, expect

    from .test_explore import GATE, SLOW, _open_the_gate

    GATE.clear()
    server = start_server(token="s3cret", app_module=lambda hub: {"slow": hub.sagas(SLOW)})
    with server.client(headers={"Authorization": "Bearer s3cret"}) as c:
        saga_id = c.post("/v1/commands/slow", json={}).json()["request_id"]
    page, _ = _page(browser, server, token="s3cret")
    assert isinstance(page, Page)
    page.goto(f"{server.base_url}/#/saga/slow/{saga_id}")
    expect(page.get_by_test_id("saga-status")).to_have_text("running", timeout=10_000)
    page.evaluate("sessionStorage.removeItem('tidings-token')")  # the token is gone
    page.get_by_test_id("saga-cancel").click()
    # The action's answer says so; or, when the page's live refresh met the 401 first and
    # drew the page again, the page itself does (with the token box): either way, the
    # user is told what to do, and the next steps supply the token.
    told = page.locator("[data-testid=saga-action-result], main p").filter(
        has_text="this server needs a token")
    expect(told.first).to_be_visible(timeout=10_000)
    page.fill("#token", "s3cret")
    page.click("#token-form button")
    page.get_by_test_id("saga-cancel").click()
    expect(page.get_by_test_id("saga-action-result")).to_contain_text("cancel requested",
                                                                     timeout=10_000)
    server.call(_open_the_gate)  # the step in progress ends; the saga compensates
    expect(page.get_by_test_id("saga-status")).to_have_text("compensated", timeout=10_000)
    expect(page.get_by_test_id("saga-reason")).to_contain_text("cancelled from the dashboard")
    expect(page.locator("[data-testid=saga-steps] tr.step-row[data-kind=compensation]")
           ).to_have_count(1)
    expect(page.get_by_test_id("saga-cancel")).to_have_count(0)
