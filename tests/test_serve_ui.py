"""The operator page of `scc serve --ui` in a real headless browser (Chromium over the DevTools protocol): behind the
token (a sign-in form until the session cookie is set), an image picked in the page is answered by the defended
model with the undefended model's answer beside it, top-k bars and the latency. The service listens on 127.0.0.1,
the browser has no network beyond it; both are started and stopped here. SCC_UI_SCREENSHOT=PATH keeps the
screenshot (docs/screenshots/serve-ui.png was made so)."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest
import torch

import scc
from scc.serve.client import Client
from scc.serve.process import ServerProcess, alive, descendants
from scc.serve.requests import decode_image

from test_serve import png_bytes

pytest.importorskip("ray", reason="Ray Serve is not installed (pip install -e '.[serve]')")
websockets = pytest.importorskip("websockets", reason="the DevTools client needs websockets")

pytestmark = pytest.mark.serve

TOKEN = "ui-token-" + "5c0ffee1" * 4
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-ui")
    token = folder / "token"
    token.write_text(TOKEN + "\n")
    os.chmod(token, 0o600)
    proc = ServerProcess(["--defense", "scc", "--backend", "eager", "--replicas", "1", "--threads", "1", "--ui",
                          "--token-file", str(token)], folder / "serve.log")
    proc.start()
    yield proc
    proc.stop()
    assert not proc.left_running, proc.left_running


def test_the_page_is_behind_the_token(server, digits):
    c = Client(server.url, timeout=30)
    try:
        status, page = c.request("GET", "/ui")
        assert status == 200 and b'name="token"' in page and b"Defended" not in page  # the sign-in form only
        status, raw = c.request("POST", "/ui/classify", png_bytes(digits[0][0]), {"Content-Type": "image/png"})
        assert status == 401 and json.loads(raw)["code"] == "unauthorized"
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        status, _ = c.request("POST", "/ui/login", b"token=wrong-token-0000000000", form)
        assert status == 401
        status, _, headers = c.request("POST", "/ui/login", urllib.parse.urlencode({"token": TOKEN}).encode(), form,
                                       with_headers=True)
        cookie = {k.lower(): v for k, v in headers.items()}["set-cookie"]
        assert status == 303 and "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
        session = {"Cookie": cookie.split(";")[0]}
        status, page = c.request("GET", "/ui", headers=session)
        assert status == 200 and b"Defended" in page and b'type="file"' in page
    finally:
        c.close()


def test_forged_and_altered_cookies_get_the_sign_in_form(server, digits):
    """A cookie made from the token's digest alone (all a cookie used to be: anyone who knew the digest could make
    it, and it never expired) opens nothing; neither does a real cookie whose issue time was moved back (the MAC
    covers it, and the service refuses a cookie MAX_AGE_S after it was issued), nor one cut short."""
    import hashlib
    import hmac

    forged = hmac.new(hashlib.sha256(TOKEN.encode()).digest(), b"scc-operator-page-v1", hashlib.sha256).hexdigest()
    c = Client(server.url, timeout=30)

    def refused(value: str) -> None:
        session = {"Cookie": f"scc_ui={value}"}
        status, page = c.request("GET", "/ui", headers=session)
        assert status == 200 and b'name="token"' in page and b"Defended" not in page, value
        status, raw = c.request("POST", "/ui/classify", png_bytes(digits[0][0]),
                                {"Content-Type": "image/png", **session})
        assert status == 401 and json.loads(raw)["code"] == "unauthorized", value

    try:
        refused(forged)
        from scc.serve.ui import MAX_AGE_S

        form = {"Content-Type": "application/x-www-form-urlencoded"}
        _, _, headers = c.request("POST", "/ui/login", urllib.parse.urlencode({"token": TOKEN}).encode(), form,
                                  with_headers=True)
        value = {k.lower(): v for k, v in headers.items()}["set-cookie"].split(";")[0].split("=", 1)[1]
        issued, _, mac = value.partition(".")
        assert abs(int(issued) - time.time()) < 120 and len(mac) == 64, value
        for altered in (f"{int(issued) - MAX_AGE_S - 60}.{mac}", f"{issued}.{mac[:32]}", f"{issued}.{forged}"):
            refused(altered)
        status, page = c.request("GET", "/ui", headers={"Cookie": f"scc_ui={value}"})
        assert status == 200 and b"Defended" in page
    finally:
        c.close()


def test_the_start_up_self_test_passed(server):
    """Plain HTTP on 127.0.0.1: the stalled-header probe got its 408 and every socket is on loopback (no TLS to
    check)."""
    lines = server.log_lines("scc serve: self-test passed: ", timeout=30)
    assert len(lines) == 1 and "closed with 408 after" in lines[0] and "listening sockets on loopback" in lines[0]
    assert "TLS" not in lines[0], lines


class DevTools:
    """Headless Chromium and one page, driven over the DevTools protocol."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--no-first-run", "--no-default-browser-check", f"--user-data-dir={folder}", "--remote-debugging-port=0",
             "--remote-debugging-address=127.0.0.1", "--window-size=1100,620", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.seen = {self.proc.pid}
        port_file = folder / "DevToolsActivePort"
        deadline = time.time() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            assert time.time() < deadline and self.proc.poll() is None, "chromium did not start"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        c = Client(f"http://127.0.0.1:{port}", timeout=10)
        try:
            while True:
                targets = json.loads(c.request("GET", "/json/list")[1])
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    break
                assert time.time() < deadline, targets
                time.sleep(0.1)
        finally:
            c.close()
        self.url = pages[0]["webSocketDebuggerUrl"]
        self.ids = 0

    async def __aenter__(self):
        self.ws = await websockets.connect(self.url, max_size=None)
        return self

    async def __aexit__(self, *exc):
        await self.ws.close()

    async def send(self, method: str, **params) -> dict:
        self.ids += 1
        await self.ws.send(json.dumps({"id": self.ids, "method": method, "params": params}))
        while True:
            message = json.loads(await asyncio.wait_for(self.ws.recv(), 60))
            if message.get("id") == self.ids:
                assert "error" not in message, (method, message)
                return message.get("result", {})

    async def js(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    async def until(self, expression: str, timeout: float = 60.0):
        deadline = time.time() + timeout
        while True:
            value = await self.js(expression)
            if value:
                return value
            assert time.time() < deadline, expression
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        self.seen |= descendants(self.proc.pid)
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        deadline = time.time() + 10
        while time.time() < deadline and any(alive(p) for p in self.seen):
            time.sleep(0.2)
        for p in self.seen:
            if alive(p):
                os.kill(p, signal.SIGKILL)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install -y chromium)")
def test_an_image_picked_in_the_page_is_answered_beside_the_undefended_model(server, digits, tmp_path):
    x = digits[0][3]
    image = tmp_path / "digit.png"
    image.write_bytes(png_bytes(x))
    clf = scc.load("scc-tiny-digits")
    with torch.no_grad():
        undefended = clf(decode_image(image.read_bytes(), clf.preprocess, 10 ** 6)[None]).softmax(-1)[0]
    browser = DevTools(tmp_path / "profile")

    async def session():
        async with browser as page:
            await page.send("Page.enable")
            await page.send("Emulation.setDeviceMetricsOverride", width=1100, height=620, deviceScaleFactor=1,
                            mobile=False)
            await page.send("Page.navigate", url=f"{server.url}/ui")
            await page.until("document.getElementById('token') !== null")
            await page.js(f"document.getElementById('token').value = {json.dumps(TOKEN)}; "
                          "document.querySelector('form').submit(); true")
            await page.until("document.getElementById('file') !== null")
            root = await page.send("DOM.getDocument")
            node = await page.send("DOM.querySelector", nodeId=root["root"]["nodeId"], selector="#file")
            await page.send("DOM.setFileInputFiles", files=[str(image)], nodeId=node["nodeId"])
            await page.until("document.body.dataset.answered === '1'")
            await page.until("document.querySelector('#preview img') && document.querySelector('#preview img')"
                             ".complete")
            seen = await page.js("""JSON.stringify({
                defended: document.querySelector('#defended .label').textContent,
                undefended: document.querySelector('#undefended .label').textContent,
                spec: document.querySelector('#defended .spec').textContent,
                bars: [document.querySelectorAll('#defended .bar').length,
                       document.querySelectorAll('#undefended .bar').length],
                status: document.getElementById('status').textContent,
                ms: document.querySelector('#defended .ms').textContent})""")
            shot = await page.send("Page.captureScreenshot", format="png")
            return json.loads(seen), base64.b64decode(shot["data"])

    try:
        seen, png = asyncio.run(session())
    finally:
        browser.stop()
    labels = clf.labels
    assert seen["defended"] in labels and seen["spec"] == "scc" and seen["bars"] == [5, 5], seen
    assert seen["undefended"] == labels[int(undefended.argmax())], seen
    assert "answered in" in seen["status"] and "draws fresh" in seen["status"] and "compute" in seen["ms"], seen
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    (tmp_path / "serve-ui.png").write_bytes(png)
    keep = os.environ.get("SCC_UI_SCREENSHOT")
    if keep:
        Path(keep).write_bytes(png)
