"""The web console in a real browser: Debian's headless Chromium driven
through its DevTools protocol (`--dump-dom` never returns while the page
holds its trace stream open). Loads the page, waits until every device and a
live value are rendered, looks at it at phone size, starts the trace view,
keeps screenshots, and records every request the page makes: none may leave
for another host."""

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

import websocket


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.profile = tempfile.mkdtemp(prefix="fieldgate-chromium-")
        self.process = subprocess.Popen(
            [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-extensions", "--disable-background-networking", "--disable-sync",
             "--disable-component-update", "--disable-default-apps", "--disable-dev-shm-usage",
             f"--user-data-dir={self.profile}", f"--remote-debugging-port={port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        targets = None
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    targets = [t for t in json.load(r) if t.get("type") == "page"]
                if targets:
                    break
            except OSError:
                time.sleep(0.2)
        if not targets:
            raise RuntimeError("Chromium's DevTools endpoint never came up")
        self.ws = websocket.create_connection(targets[0]["webSocketDebuggerUrl"], timeout=30,
                                              suppress_origin=True)
        self.next_id = 0
        self.requests = []

    def call(self, method, **params):
        self.next_id += 1
        mine = self.next_id
        self.ws.send(json.dumps({"id": mine, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("method") == "Network.requestWillBeSent":
                self.requests.append(message["params"]["request"]["url"])
            if message.get("id") == mine:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def wait_for(self, expression, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.evaluate(expression):
                return True
            time.sleep(0.2)
        return False

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self):
        try:
            self.ws.close()
        finally:
            self.process.terminate()
            self.process.wait()
            shutil.rmtree(self.profile, ignore_errors=True)


def check_console(check, url, devices, live_text, artifacts):
    """`devices`: names the page must show; `live_text`: a value the test
    set at the slave, as the page shows it."""
    if chromium() is None:
        check("console: chromium is installed", False, "no chromium on PATH")
        return
    os.makedirs(artifacts, exist_ok=True)
    browser = Browser()
    try:
        browser.call("Network.enable")
        browser.call("Page.enable")
        browser.call("Emulation.setDeviceMetricsOverride", width=1280, height=900,
                     deviceScaleFactor=1, mobile=False)
        browser.call("Page.navigate", url=url)
        shown = all(browser.wait_for(f"document.getElementById('devices') && "
                                     f"document.getElementById('devices').innerText.includes({json.dumps(d)})")
                    for d in devices)
        check("console: every device is listed", shown, browser.evaluate("document.body.innerText"))
        live = browser.wait_for(f"document.getElementById('devices').innerText.includes({json.dumps(live_text)})")
        check(f"console: the live value {live_text!r} is shown", live,
              browser.evaluate("document.getElementById('devices').innerText"))
        online = browser.wait_for("document.querySelectorAll('#devices .badge.up').length >= %d" % len(devices))
        check("console: the devices show online", online)
        buses = browser.evaluate("document.getElementById('buses').innerText")
        check("console: the bus shows its transport and bus time", buses and "serial" in buses and "%" in buses, buses)
        browser.screenshot(f"{artifacts}/console.png")

        # A phone: nothing wider than the screen, the device view reads now.
        browser.call("Emulation.setDeviceMetricsOverride", width=390, height=844,
                     deviceScaleFactor=2, mobile=True)
        time.sleep(0.5)
        width = browser.evaluate("document.documentElement.scrollWidth")
        check("console: fits a 390 px phone screen", width is not None and width <= 392, width)
        browser.evaluate(f"document.querySelector('#devices tr.device[data-name={json.dumps(devices[0])}]').click()")
        browser.evaluate("document.getElementById('read-now').click()")
        read = browser.wait_for("document.getElementById('msg').innerText.includes('read just now')")
        check("console: read now answers", read, browser.evaluate("document.getElementById('msg').innerText"))
        browser.screenshot(f"{artifacts}/console-phone-device.png")

        browser.evaluate("document.getElementById('tab-trace').click()")
        browser.evaluate("document.getElementById('t-toggle').click()")
        traced = browser.wait_for("/fc0\\d .* ok/.test(document.getElementById('trace').textContent)")
        check("console: the trace view shows live transactions", traced,
              browser.evaluate("document.getElementById('trace').textContent"))
        browser.screenshot(f"{artifacts}/console-phone-trace.png")

        host = url.split("/")[2]
        foreign = [u for u in browser.requests if not (u.startswith(f"http://{host}/") or u.startswith("data:"))]
        check("console: no request leaves for another host", not foreign and browser.requests, foreign or "no requests seen")
    finally:
        browser.close()
