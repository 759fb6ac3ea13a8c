"""The interactive API docs in a real browser (Debian's chromium, driven by Playwright):
/v2/docs renders every route of the OpenAPI document from Swagger UI served by Salvo itself,
with no request leaving for another host, and its "Try it out" runs a model's example
request against the server."""

from __future__ import annotations

import json
import urllib.request
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import sync_playwright

from tests.tools import require


@pytest.fixture(scope="module")
def browser():
    chromium = require("chromium")
    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield launched
        launched.close()


def test_the_docs_render_from_the_server_alone_and_run_an_example(demo_server, browser) -> None:
    port = demo_server.http_port
    page = browser.new_page()
    hosts: set[str] = set()
    page.on("request", lambda request: hosts.add(urlsplit(request.url).netloc))
    page.goto(f"http://127.0.0.1:{port}/v2/docs")
    infer = page.locator("#operations-models-infer_v2_models__model__infer_post")
    infer.wait_for()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/docs/openapi.json") as reply:
        paths = json.load(reply)["paths"]
    assert page.locator(".opblock").count() == sum(len(ops) for ops in paths.values())

    infer.locator(".opblock-summary").click()
    infer.get_by_role("button", name="Try it out").click()
    infer.locator("input[placeholder='model']").fill("mlp")
    infer.locator(".examples-select select").select_option("mlp")
    infer.get_by_role("button", name="Execute").click()
    answer = infer.locator(".live-responses-table tbody .response-col_status").first
    answer.wait_for()
    assert answer.inner_text().strip() == "200"
    shown = infer.locator(".live-responses-table tbody .response-col_description pre").first
    text = shown.inner_text()
    assert '"model_name": "mlp"' in text and '"name": "output"' in text
    assert hosts == {f"127.0.0.1:{port}"}, hosts
    page.close()
