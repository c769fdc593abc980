"""The wallboard in a real browser: Debian's headless chromium, driven by
Selenium through Debian's chromedriver, watches `pbx serve` while a SIPp
caller joins a queue and an agent pauses; each shows on the page within a
second of the server's own word for it (its queue.joined event, the pause's
API answer).

Selenium blocks, so every browser step runs in a thread: the test's loop
keeps reading the server's log meanwhile."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.wait import WebDriverWait

from tests.support.server import Server, queue_settings, restart_server, start_server
from tests.support.sipp import SippProcess, start_sipp

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None, reason="chromium and chromium-driver are not installed (make test-deps)"
)

REPO = Path(__file__).resolve().parent.parent
SIPP = Path(__file__).parent / "sipp"
QUEUE_NUMBER = "7000"
TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TV = (1920, 1080)
PHONE = (390, 844)
SHOWN_WITHIN = 1.0  # seconds, the promise
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

T = TypeVar("T")


def open_browser() -> WebDriver:
    """Headless chromium at a TV's size, with the system's driver: Selenium
    Manager is never asked for (it would download a browser)."""
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-extensions", f"--window-size={TV[0]},{TV[1]}"):  # fmt: skip
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))


@pytest.fixture
async def browser() -> AsyncIterator[WebDriver]:
    driver = await asyncio.to_thread(open_browser)
    yield driver
    await asyncio.to_thread(driver.quit)


async def on_page(step: Callable[..., T], *args: Any) -> T:
    """One blocking browser step, off the loop."""
    return await asyncio.to_thread(step, *args)


def shown(driver: WebDriver, selector: str, timeout: float) -> WebElement:
    """The element ``selector`` finds once it is displayed, polled every 20 ms."""
    wait = WebDriverWait(driver, timeout, poll_frequency=0.02)
    return wait.until(
        lambda d: next((e for e in d.find_elements(By.CSS_SELECTOR, selector) if e.is_displayed()), False),
        f"{selector} not shown within {timeout} s",
    )


def status_becomes(driver: WebDriver, status: str, timeout: float) -> None:
    WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-status") == status,
        f"the page's status did not become {status} within {timeout} s",
    )


def text_changes(element: WebElement, timeout: float) -> str:
    before = element.text
    WebDriverWait(element, timeout, poll_frequency=0.05).until(lambda e: e.text != before, f"{before!r} did not change")
    return element.text


def rect(driver: WebDriver, selector: str) -> dict[str, float]:
    return driver.execute_script("return document.querySelector(arguments[0]).getBoundingClientRect().toJSON()", selector)


async def wallboard_server(folder: Path) -> Server:
    """Queues `support` (at 7000, agents 1001 and 1002, none registered, so
    a caller waits) and `sales` (agent 1003)."""
    return await start_server(
        folder,
        sounds={"dir": str(REPO / "config" / "sounds")},
        inbound={QUEUE_NUMBER: "queue:support"},
        trunks={"carrier": {"host": "127.0.0.2:5060", "inbound_from": ["127.0.0.2/32"]}},
        queues={"support": queue_settings(["1001", "1002"]), "sales": queue_settings(["1003"])},
        log_level="INFO",
    )


def base_url(server: Server) -> str:
    return f"http://127.0.0.1:{server.http_port}"


async def new_ticket(http: aiohttp.ClientSession) -> str:
    async with http.post("/api/tickets", headers=AUTH) as response:
        assert response.status == 201, await response.text()
        return str((await response.json())["ticket"])


async def next_event(feed: aiohttp.ClientWebSocketResponse, kind: str, timeout: float = 10.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            event = await feed.receive_json()
            if event["type"] == kind:
                return dict(event)


async def test_a_caller_joining_and_an_agent_pausing_show_within_a_second_on_a_tv_and_a_phone(
    tmp_path: Path, browser: WebDriver
) -> None:
    server = await wallboard_server(tmp_path / "pbx")
    caller: SippProcess | None = None
    try:
        async with aiohttp.ClientSession(base_url(server)) as http:
            ticket = await new_ticket(http)
            await on_page(browser.get, f"{base_url(server)}/wallboard#ticket={ticket}")
            await on_page(shown, browser, "[data-queue='support'] [data-agent='1001'][data-state='available']", 10)
            assert browser.current_url == f"{base_url(server)}/wallboard", "the spent ticket stays in the address bar"
            assert browser.find_element(By.ID, "login").is_displayed() is False

            async with http.ws_connect("/api/events?types=queue.joined", headers=AUTH) as feed:
                caller = await start_sipp(
                    SIPP / "queue_caller.xml", server.sip, local_ip="127.0.0.2", service=QUEUE_NUMBER, calls=1,
                    timeout=60, ready_timeout=0, extra=("-set", "caller", "+15550001"),
                )  # fmt: skip
                joined = await next_event(feed, "queue.joined")
            started = time.monotonic()
            row = await on_page(shown, browser, f"[data-queue='support'] [data-caller='{joined['call_id']}']", SHOWN_WITHIN)
            caller_latency = time.monotonic() - started
            print(f"caller shown {caller_latency * 1000:.0f} ms after the queue.joined event")
            assert row.find_element(By.CLASS_NAME, "who").text == "+15550001"
            async with http.get("/api/queues/support", headers=AUTH) as response:
                assert [c["id"] for c in (await response.json())["callers"]] == [joined["call_id"]]
            waiting = browser.find_element(By.CSS_SELECTOR, "[data-queue='support'] [data-figure='waiting'] dd")
            assert waiting.text == "1"
            # The wait ticks on the page, between the server's messages too.
            wait_text = row.find_element(By.CLASS_NAME, "wait")
            assert re.fullmatch(r"0:0\d", await on_page(text_changes, wait_text, 2.5))

            async with http.post("/api/queues/support/agents/1001", json={"action": "pause"}, headers=AUTH) as response:
                assert (await response.json())["state"] == "paused"
            started = time.monotonic()
            agent = await on_page(shown, browser, "[data-queue='support'] [data-agent='1001'][data-state='paused']", SHOWN_WITHIN)
            pause_latency = time.monotonic() - started
            print(f"pause shown {pause_latency * 1000:.0f} ms after the API's answer")
            assert agent.find_element(By.CLASS_NAME, "state").text.lower() == "paused"
            assert re.fullmatch(r"0:0\d", agent.find_element(By.CLASS_NAME, "timer").text)
            assert browser.find_element(By.CSS_SELECTOR, "[data-agent='1002']").get_attribute("data-state") == "available"

            # On the TV the two queues stand side by side.
            support, sales = rect(browser, "[data-queue='support']"), rect(browser, "[data-queue='sales']")
            assert support["top"] == sales["top"] and sales["left"] >= support["right"], (support, sales)
            tv_png = tmp_path / "wallboard-tv.png"
            assert await on_page(browser.save_screenshot, str(tv_png))
            assert tv_png.read_bytes().startswith(PNG_SIGNATURE) and tv_png.stat().st_size > 10_000

            # On a phone: one column, nothing wider than the screen.
            await on_page(browser.set_window_size, *PHONE)
            width = browser.execute_script("return document.documentElement.clientWidth")
            assert width <= PHONE[0], width
            support, sales = rect(browser, "[data-queue='support']"), rect(browser, "[data-queue='sales']")
            assert support["left"] == sales["left"] and sales["top"] >= support["bottom"], (support, sales)
            assert support["right"] <= width and sales["right"] <= width
            assert browser.execute_script("return document.documentElement.scrollWidth") <= width
            phone_png = tmp_path / "wallboard-phone.png"
            assert await on_page(browser.save_screenshot, str(phone_png))
            assert phone_png.read_bytes().startswith(PNG_SIGNATURE) and phone_png.stat().st_size > 5_000
    finally:
        await server.stop()
        if caller is not None:
            await caller.stop()


async def test_a_used_or_made_up_ticket_is_refused_and_the_page_shows_no_data(tmp_path: Path, browser: WebDriver) -> None:
    server = await wallboard_server(tmp_path / "pbx")
    try:
        async with aiohttp.ClientSession(base_url(server)) as http:
            ticket = await new_ticket(http)
            async with http.ws_connect(f"/api/events?types=wallboard&ticket={ticket}") as ws:
                board = await ws.receive_json(timeout=5)
                assert board["type"] == "wallboard" and [q["name"] for q in board["queues"]] == ["support", "sales"]
            for spent in (ticket, "made-up-ticket"):
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(f"/api/events?types=wallboard&ticket={spent}")
                assert refused.value.status == 401

            await on_page(browser.get, f"{base_url(server)}/wallboard#ticket={ticket}")
            await on_page(status_becomes, browser, "login", 10)
            error = await on_page(shown, browser, "#login-error", 1)
            assert "used or expired" in error.text
            assert browser.find_elements(By.CSS_SELECTOR, "[data-queue]") == []
    finally:
        await server.stop()


async def test_the_page_asks_for_the_token_keeps_it_in_the_tab_and_reconnects_after_a_restart(
    tmp_path: Path, browser: WebDriver
) -> None:
    server = await wallboard_server(tmp_path / "pbx")
    try:
        async with aiohttp.ClientSession(base_url(server)) as http:
            for path, kind in (("/wallboard", "text/html"), ("/wallboard.css", "text/css"), ("/wallboard.js", "text/javascript")):
                async with http.get(path) as response:  # no token: the files hold no data
                    assert response.status == 200 and response.content_type == kind, (path, response.status)
                    policy = response.headers["Content-Security-Policy"]
                    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy and "form-action 'none'" in policy
                    assert response.headers["X-Frame-Options"] == "DENY"
            async with http.get("/wallboard") as response:
                html = await response.text()
            assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script, which the policy refuses"
            assert not re.search(r"\b(src|href)=\"(https?:)?//", html), "something from another host"

        await on_page(browser.get, f"{base_url(server)}/wallboard")
        await on_page(status_becomes, browser, "login", 10)
        token = await on_page(shown, browser, "#token", 1)
        assert browser.find_elements(By.CSS_SELECTOR, "[data-queue]") == []

        await on_page(token.send_keys, "wrong-token")
        await on_page(browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click)
        error = await on_page(shown, browser, "#login-error", 5)
        assert error.text == "Wrong token."
        assert browser.execute_script("return sessionStorage.length") == 0

        await on_page(token.clear)
        await on_page(token.send_keys, TOKEN)
        await on_page(browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click)
        await on_page(shown, browser, "[data-queue='sales'] [data-agent='1003']", 5)
        assert browser.execute_script("return Object.values(sessionStorage)") == [TOKEN]
        assert browser.execute_script("return [localStorage.length, document.cookie]") == [0, ""]

        # A reload, then a server restart: each time a fresh ticket from the kept token.
        await on_page(browser.refresh)
        await on_page(shown, browser, "[data-queue='support'] [data-agent='1001']", 5)
        assert not browser.find_element(By.ID, "login").is_displayed()
        assert await server.stop() == 0, "an open wallboard held the server up"
        await on_page(status_becomes, browser, "reconnecting", 5)
        server = await restart_server(server, log_level="INFO")
        await on_page(status_becomes, browser, "live", 15)
        assert browser.find_element(By.CSS_SELECTOR, "[data-queue='support']").is_displayed()
    finally:
        await server.stop()
