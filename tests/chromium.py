"""A real headless Chromium driven over the DevTools protocol, for the report's viewer tests.

Chromium talks the protocol over a pipe (``--remote-debugging-pipe``: it reads JSON messages ending in a NUL byte
from descriptor 3 and writes its own to descriptor 4), as Puppeteer's ``pipe`` mode does, so a test needs neither
a driver binary nor a WebSocket library. Tests that need it are skipped where no Chromium is installed.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class BrowserError(RuntimeError):
    pass


class Chromium:
    """One headless Chromium with one page; ``send`` a protocol command to the page, get its result."""

    def __init__(self, width: int = 1400, height: int = 2000):
        if CHROMIUM is None:
            raise BrowserError("no Chromium on this machine (Debian: apt install chromium)")
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()

        def descriptors() -> None:  # in the child, before exec: its end of each pipe as 3 and 4, kept open by exec
            # first above 10, so that neither end is already 3 or 4 (dup2 onto itself would keep close-on-exec)
            reading, writing = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser))
            os.dup2(reading, 3)
            os.dup2(writing, 4)

        arguments = ["--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run"]
        arguments += [f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"]
        self.process = subprocess.Popen(
            [CHROMIUM, *arguments],
            preexec_fn=descriptors,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._next, self.events = b"", 0, []
        self.session: str | None = None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")

    def send(self, method: str, timeout: float = 60, session: str | None = None, **params: Any) -> dict:
        """Run one command (on the page once attached; in another ``session``; "": on the browser) and wait for its
        result."""
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if target := self.session if session is None else session:
            message["sessionId"] = target
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.time() + timeout
        while time.time() < deadline:
            reply = self._message(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)
        raise BrowserError(f"{method}: no answer in {timeout} s")

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.time() > deadline or self.process.poll() is not None:
                raise BrowserError("Chromium stopped answering")
            self._buffer += os.read(self._read, 1 << 20)
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str, timeout: float = 60) -> None:
        """Load ``url`` and wait for its load event."""
        self.events.clear()
        self.send("Page.navigate", url=url)
        deadline = time.time() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            if time.time() > deadline:
                raise BrowserError(f"{url} did not load in {timeout} s")
            self.events.append(self._message(deadline))

    def evaluate(self, expression: str, frame: str | None = None) -> Any:
        """The value of a JavaScript expression (awaited when it is a promise), in the page or in a ``frame``
        (:meth:`frame`)."""
        params: dict[str, Any] = {"expression": expression, "awaitPromise": True, "returnByValue": True}
        result = self.send("Runtime.evaluate", session=frame, **params)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30, frame: str | None = None) -> Any:
        """Poll ``expression`` until it is truthy; its value."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if value := self.evaluate(expression, frame):
                return value
            time.sleep(0.2)
        raise BrowserError(f"{expression} still false after {timeout} s")

    def frame(self, url_part: str, timeout: float = 60) -> str:
        """A session in the first frame whose URL contains ``url_part``, once it has loaded. A sandboxed frame (an
        opaque origin, as MLflow's HTML artifact view makes) runs in a process of its own, a target of its own: its
        document is reachable only through it."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            targets = self.send("Target.getTargets", session="")["targetInfos"]
            found = [t for t in targets if t["type"] == "iframe" and url_part in t["url"]]
            if found:
                attached = self.send("Target.attachToTarget", session="", targetId=found[0]["targetId"], flatten=True)
                return attached["sessionId"]
            time.sleep(0.3)
        raise BrowserError(f"no frame with {url_part!r} in its URL after {timeout} s")

    def click(self, x: float, y: float) -> None:
        """A left click at page coordinates (CSS pixels)."""
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self) -> bytes:
        """The whole page as PNG bytes."""
        return base64.b64decode(self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"])

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)
        for descriptor in (self._read, self._write):
            os.close(descriptor)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
