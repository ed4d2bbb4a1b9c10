#!/usr/bin/env python3
"""Black-box test of the web dashboard in a real headless Chromium (Debian's package).

Starts `flotilla dev --token-file` with a token on a free loopback port, creates runs
through the API (one with a failing task, one needing approval, one long-running with a
streaming log, one of 50 tasks), and drives the browser through selenium +
chromedriver: the token prompt, the runs list (filter, live arrival of a new run), a
run's DAG and its colours, a log arriving live, approve, stop, restart, the executors and
cluster pages, a deep link reload, and a refused token sending the person back to the
prompt. Screenshots of every page at 1280x800 and 390x844 go to
$CARGO_TARGET_DIR/ui-screenshots/ (or target/ui-screenshots/).

Usage: browser_test.py [--bin PATH]   (default: $CARGO_TARGET_DIR/debug/flotilla)
Prints "dashboard: N passed, M failed" last; exits 1 on any failure.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

TOKEN = "ui-test-token-5c1e9a"
IMAGE = "flotilla-busybox:latest"
GROUP = "/uitest"
# Generous: the machine is shared and the containers are real.
DEADLINE_S = 90
SIZES = {"desktop": (1280, 800, False), "phone": (390, 844, True)}
# Status colours of app.css (the node's stroke).
COLOURS = {
    "success": "rgb(21, 128, 61)",
    "failed": "rgb(220, 38, 38)",
    "running": "rgb(37, 99, 235)",
    "waiting": "rgb(217, 119, 6)",
    "skipped": "rgb(203, 213, 225)",
    "stopped": "rgb(194, 65, 12)",
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Api:
    def __init__(self, base, token):
        self.base, self.token = base, token

    def call(self, method, path, body=None, token=True):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if token:
            req.add_header("Authorization", "Bearer " + self.token)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                raw = r.read()
                return r.status, dict(r.headers), (json.loads(raw) if raw and "json" in r.headers.get("content-type", "") else raw)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, dict(e.headers), json.loads(raw)
            except ValueError:
                return e.code, dict(e.headers), raw

    def ok(self, method, path, body=None):
        status, _, out = self.call(method, path, body)
        assert 200 <= status < 300, f"{method} {path} answered {status}: {out}"
        return out


def wait_for(what, fn, timeout=DEADLINE_S, interval=0.25):
    """Polls fn until it returns a truthy value; fails naming `what` and the last value."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = fn()
            if last:
                return last
        except (StaleElementReferenceException, AssertionError) as e:
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def task(name, command, depends=(), **extra):
    t = {"name": name, "image": IMAGE, "steps": [{"run": {"name": name + "-step", "command": command}}]}
    if depends:
        t["depends"] = [d if isinstance(d, dict) else {"task": d} for d in depends]
    t.update(extra)
    return t


class Test:
    def __init__(self, args):
        self.args = args
        self.passed, self.failed = [], []
        self.dir = tempfile.mkdtemp(prefix="flotilla-ui-")
        target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(os.getcwd(), "target")
        self.shots = os.path.join(target, "ui-screenshots")
        os.makedirs(self.shots, exist_ok=True)
        self.server = None
        self.driver = None
        self.runs = {}

    # ---- setup ---------------------------------------------------------------------
    def start_server(self):
        token_file = os.path.join(self.dir, "token")
        with open(token_file, "w") as f:
            f.write(TOKEN)
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.api = Api(self.base, TOKEN)
        self.log = open(os.path.join(self.dir, "dev.log"), "wb")
        self.server = subprocess.Popen(
            [self.args.bin, "dev", "--data-dir", os.path.join(self.dir, "data"),
             "--listen", f"127.0.0.1:{port}", "--token-file", token_file],
            stdout=self.log, stderr=subprocess.STDOUT)

        def executor_ready():
            try:
                st, _, out = self.api.call("GET", "/api/v1/executors")
            except OSError:
                return False
            return st == 200 and any(e["id"] == "local" for e in out["executors"])
        wait_for("the dev node and its executor", executor_ready)

    def start_browser(self):
        opts = webdriver.ChromeOptions()
        opts.binary_location = "/usr/bin/chromium"
        for a in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                  "--window-size=1280,800", "--hide-scrollbars", "--force-color-profile=srgb"]:
            opts.add_argument(a)
        self.driver = webdriver.Chrome(options=opts, service=Service("/usr/bin/chromedriver"))
        self.driver.set_page_load_timeout(30)
        self.size("desktop")

    def size(self, name):
        w, h, mobile = SIZES[name]
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                    {"width": w, "height": h, "deviceScaleFactor": 1, "mobile": mobile})

    def create_runs(self):
        fail = {"name": "ui-fail", "group": GROUP + "/fail", "tasks": [
            task("build", "echo building; echo done"),
            task("test", "echo failing on purpose; exit 3", ["build"]),
            task("deploy", "echo never", ["test"]),
            task("notify", "echo test failed", [{"task": "test", "conditions": ["on_failure"]}]),
        ]}
        approve = {"name": "ui-approve", "group": GROUP + "/approve", "tasks": [
            task("prepare", "echo prepared"),
            task("release", "echo released", ["prepare"], needs_approval=True),
            task("after", "echo after release", ["release"]),
        ]}
        long = {"name": "ui-long", "group": GROUP + "/long", "tasks": [
            task("stream", "i=0; while [ $i -lt 600 ]; do i=$((i+1)); echo \"line $i\"; sleep 0.3; done"),
        ]}
        # 50 tasks in five layers; a gate needing approval keeps them from running.
        wide = [task("gate", "true", needs_approval=True)]
        for layer in range(1, 5):
            for i in range(12 if layer < 4 else 13):
                parents = ["gate"] if layer == 1 else [f"l{layer-1}-t{i % 12:02d}", f"l{layer-1}-t{(i * 5 + 1) % 12:02d}"]
                wide.append(task(f"l{layer}-t{i:02d}", "true", sorted(set(parents))))
        assert len(wide) == 50, len(wide)
        wide_run = {"name": "ui-wide", "group": GROUP + "/wide", "tasks": wide}
        for key, body in [("fail", fail), ("approve", approve), ("long", long), ("wide", wide_run)]:
            self.runs[key] = self.api.ok("POST", "/api/v1/runs", body)["id"]

    def run_state(self, key):
        return self.api.ok("GET", f"/api/v1/runs/{self.runs[key]}")

    # ---- browser helpers -------------------------------------------------------------
    def q(self, css):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def qs(self, css):
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def visible(self, css):
        els = self.qs(css)
        return els[0] if els and els[0].is_displayed() else None

    def shot(self, name):
        """Both sizes of the current page; leaves the desktop size on."""
        for size in SIZES:
            self.size(size)
            time.sleep(0.4)
            if size == "phone":
                width = self.driver.execute_script("return document.documentElement.scrollWidth")
                assert width <= 392, f"page {name} is {width}px wide at 390px: it scrolls sideways"
            self.driver.save_screenshot(os.path.join(self.shots, f"{name}-{size}.png"))
        self.size("desktop")

    def node_status(self, name):
        els = self.qs(f'#dag g.node[data-task="{name}"]')
        return els[0].get_attribute("data-status") if els else None

    def node_colour(self, name):
        rect = self.q(f'#dag g.node[data-task="{name}"] rect')
        return self.driver.execute_script("return getComputedStyle(arguments[0]).stroke", rect)

    def click(self, what, css):
        """Clicks the element matching css once it is shown (the page may re-render it meanwhile)."""
        def attempt():
            el = self.visible(css)
            if el is None:
                return False
            el.click()
            return True
        wait_for(what, attempt)

    def open(self, path):
        self.driver.get(self.base + path)

    # ---- checks ----------------------------------------------------------------------
    def check_assets_and_headers(self):
        st, headers, _ = self.api.call("GET", "/ui/", token=False)
        assert st == 200, st
        csp = headers.get("content-security-policy", "")
        for want in ["default-src 'none'", "script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"]:
            assert want in csp, f"CSP {csp!r} lacks {want}"
        assert "unsafe-inline" not in csp, csp
        st, headers, body = self.api.call("GET", f"/ui/runs/{self.runs['fail']}", token=False)
        assert st == 200 and b"/ui/assets/app.js" in body, (st, body[:200])
        st, headers, body = self.api.call("GET", "/ui/assets/api.js", token=False)
        assert st == 200 and b"sessionStorage" in body, st
        assert headers.get("content-type", "").startswith("text/javascript"), headers
        st, _, body = self.api.call("GET", "/ui/assets/nope.js", token=False)
        assert st == 404 and body.get("code") == "not_found", (st, body)
        st, _, body = self.api.call("GET", f"/api/v1/runs/{self.runs['fail']}/graph", token=False)
        assert st == 401, (st, body)
        graph = self.api.ok("GET", f"/api/v1/runs/{self.runs['fail']}/graph")
        layers = {t["name"]: t["layer"] for t in graph["tasks"]}
        assert layers == {"build": 0, "test": 1, "deploy": 2, "notify": 2}, layers

    def check_token_prompt(self):
        self.open("/ui/")
        wait_for("the token prompt", lambda: self.visible("#token"))
        self.shot("login")
        self.q("#token").send_keys("wrong-token")
        self.q("#login-form button").click()
        err = wait_for("the refusal of a wrong token", lambda: self.visible("#login-error"))
        assert "refused" in err.text, err.text
        self.q("#token").send_keys(TOKEN + Keys.ENTER)
        wait_for("the runs table", lambda: self.visible("#runs-table"))
        kept = self.driver.execute_script("return sessionStorage.getItem('flotilla.token')")
        assert kept == TOKEN, "the token is not kept in sessionStorage"
        assert TOKEN not in self.driver.page_source, "the token is rendered in the page"

    def check_runs_list(self):
        ids = lambda: [r.get_attribute("data-run") for r in self.qs("#runs-table tbody tr")]
        want = sorted(self.runs.values(), reverse=True)
        wait_for("the four runs, newest first", lambda: ids() == want)
        wait_for("the live indicator", lambda: self.q("#live").text == "live")
        # Filter by phase through the form: the URL carries it and only running runs stay.
        Select(self.q("#f-phase")).select_by_value("running")
        wait_for("the phase filter in the URL", lambda: "phase=running" in self.driver.current_url)
        wait_for("only running runs", lambda: ids() and all(
            r.get_attribute("data-phase") == "running" for r in self.qs("#runs-table tbody tr")))
        self.open(f"/ui/?group={GROUP}/approve")
        wait_for("the group filter", lambda: ids() == [self.runs["approve"]])
        # A run created now appears without a reload (event stream).
        self.open("/ui/")
        wait_for("the runs table", lambda: len(ids()) >= 4)
        self.driver.execute_script("window.__marker = 1")
        extra = self.api.ok("POST", "/api/v1/runs", {"name": "ui-live", "group": GROUP + "/live",
                                                    "tasks": [task("hello", "echo hello")]})["id"]
        self.runs["live"] = extra
        wait_for("the new run in the list", lambda: extra in ids(), timeout=30)
        assert self.driver.execute_script("return window.__marker") == 1, "the page reloaded"
        wait_for("the new run finishing, live", lambda: any(
            r.get_attribute("data-run") == extra and r.get_attribute("data-phase") == "finished"
            for r in self.qs("#runs-table tbody tr")))
        self.shot("runs")

    def check_failed_run(self):
        wait_for("the failing run to finish", lambda: self.run_state("fail")["phase"] == "finished")
        # Open it from the list, as a person would.
        self.open("/ui/")
        self.click("the failing run's link", f'tr[data-run="{self.runs["fail"]}"] a')
        wait_for("the DAG", lambda: len(self.qs("#dag g.node")) == 4)
        want = {"build": "success", "test": "failed", "deploy": "skipped", "notify": "success"}
        wait_for("the task colours", lambda: {n: self.node_status(n) for n in want} == want)
        for name, st in want.items():
            assert self.node_colour(name) == COLOURS[st], (name, self.node_colour(name))
        assert len(self.qs("#dag path.edge")) == 3, "three dependency edges"
        # The failed task is selected; its step shows exit code 3 and its log.
        wait_for("the failed task's panel", lambda: "test" in self.q("#task-panel h2").text)
        row = self.q('#steps tr[data-step="0"]')
        assert row.find_elements(By.CSS_SELECTOR, "td")[-1].text == "3", row.text
        wait_for("the stored log", lambda: "failing on purpose" in self.q("#log").text)
        assert self.q("#task-status").get_attribute("data-status") == "failed"
        # Keyboard: focus a node, Enter selects it.
        node = self.q('#dag g.node[data-task="build"]')
        self.driver.execute_script("arguments[0].focus()", node)
        node.send_keys(Keys.ENTER)
        wait_for("keyboard selection", lambda: self.q("#task-panel h2").text.startswith("build"))
        wait_for("the build log", lambda: "building" in self.q("#log").text)
        self.shot("run-failed")
        # Restart: a new run (201) or, on a server without restart, the refusal shown.
        self.click("the restart button", "#restart")
        def restarted():
            if self.visible("#alert") and "Restart refused" in self.q("#alert").text:
                return "refused: " + self.q("#alert").text
            path = self.driver.current_url.split("?")[0]
            if path.rstrip("/").split("/")[-1] not in (self.runs["fail"], "") and "/ui/runs/" in path:
                return "restarted as " + path
            return None
        print("  restart:", wait_for("the restart's answer", restarted, timeout=30))

    def check_live_log_and_stop(self):
        self.open(f"/ui/runs/{self.runs['long']}")
        wait_for("the long task running", lambda: self.node_status("stream") == "running")
        assert self.node_colour("stream") == COLOURS["running"]
        wait_for("the first log lines", lambda: "line 3" in self.q("#log").text)
        n = len(self.q("#log").text.splitlines())
        wait_for("more log lines arriving live", lambda: len(self.q("#log").text.splitlines()) >= n + 5, timeout=30)
        assert "following" in self.q("#log-state").text, self.q("#log-state").text
        self.shot("run-live")
        self.click("the stop button", "#stop")
        wait_for("the run stopped", lambda: self.q("#run-phase").get_attribute("data-phase") == "finished")
        wait_for("the stopped colour", lambda: self.node_status("stream") == "stopped")
        assert self.node_colour("stream") == COLOURS["stopped"]
        assert self.run_state("long")["result"] == "stopped"
        # The log is now read from the store, the stop button gone.
        assert not self.qs("#stop"), "a stop button on a finished run"

    def check_approval(self):
        self.open(f"/ui/runs/{self.runs['approve']}")
        wait_for("the waiting task", lambda: self.node_status("release") == "waiting")
        assert self.node_colour("release") == COLOURS["waiting"]
        wait_for("the waiting task selected", lambda: self.q("#task-panel h2").text.startswith("release"))
        self.shot("run-approve")
        button = self.q("#approve")
        assert button.tag_name == "button"
        self.driver.execute_script("arguments[0].focus()", button)
        button.send_keys(Keys.ENTER)
        wait_for("the approved task proceeding", lambda: self.node_status("release") in ("running", "success"), timeout=240)
        wait_for("the run finishing after approval", lambda: self.node_status("after") == "success")
        assert self.run_state("approve")["result"] == "success"

    def check_wide_dag(self):
        self.open(f"/ui/runs/{self.runs['wide']}")
        wait_for("50 nodes", lambda: len(self.qs("#dag g.node")) == 50)
        boxes = self.driver.execute_script("""
            return [...document.querySelectorAll('#dag g.node rect')].map(r => {
              const b = r.getBBox(); return [b.x, b.y, b.width, b.height]; })""")
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                overlap = a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]
                assert not overlap, f"nodes overlap: {a} {b}"
        size = self.driver.execute_script(
            "return parseFloat(getComputedStyle(document.querySelector('#dag g.node text.name')).fontSize)")
        assert size >= 12, f"node labels are {size}px"
        rendered = self.driver.execute_script(
            "const r = document.querySelector('#dag g.node rect').getBoundingClientRect(); return [r.width, r.height]")
        assert rendered[0] >= 150 and rendered[1] >= 40, f"nodes drawn at {rendered}: shrunk"
        columns = {round(b[0]) for b in boxes}
        assert len(columns) == 5, f"{len(columns)} columns for 5 layers"
        self.shot("run-wide")
        self.api.ok("PUT", f"/api/v1/runs/{self.runs['wide']}/actions", {"action": "stop"})

    def check_executors_and_cluster(self):
        self.click("the executors link", '#nav a[data-page="executors"]')
        row = wait_for("the local executor", lambda: self.visible('#executors tr[data-executor="local"]'))
        assert "ago" in row.text or "just now" in row.text, row.text
        self.shot("executors")
        self.click("the cluster link", '#nav a[data-page="cluster"]')
        wait_for("the leader", lambda: self.visible("#leader") and self.q("#leader").text == "1")
        row = wait_for("node 1", lambda: self.visible('#nodes tr[data-node="1"]'))
        assert "voter" in row.text and "leader" in row.text, row.text
        assert self.q("#maintenance-state").text == "off"
        self.shot("cluster")

    def check_deep_link_and_refused_token(self):
        self.open(f"/ui/runs/{self.runs['fail']}?task=notify")
        wait_for("the deep-linked run and task", lambda: self.visible("#task-panel h2")
                 and self.q("#task-panel h2").text.startswith("notify"))
        self.driver.execute_script("sessionStorage.setItem('flotilla.token', 'changed-meanwhile')")
        self.click("the executors link", '#nav a[data-page="executors"]')
        wait_for("the token prompt after a 401", lambda: self.visible("#token"))
        wait_for("the refusal shown at the prompt", lambda: "refused" in self.q("#login-error").text)
        assert "changed-meanwhile" not in self.driver.page_source

    # ---- driver ----------------------------------------------------------------------
    def run(self):
        try:
            self.start_server()
            self.create_runs()
            self.start_browser()
            for check in [self.check_assets_and_headers, self.check_token_prompt, self.check_runs_list,
                          self.check_failed_run, self.check_live_log_and_stop, self.check_approval,
                          self.check_wide_dag, self.check_executors_and_cluster,
                          self.check_deep_link_and_refused_token]:
                name = check.__name__
                t0 = time.monotonic()
                try:
                    check()
                    self.passed.append(name)
                    print(f"ok   {name} ({time.monotonic() - t0:.1f} s)", flush=True)
                except Exception:
                    self.failed.append(name)
                    print(f"FAIL {name}", flush=True)
                    traceback.print_exc()
                    if self.driver:
                        try:
                            self.driver.save_screenshot(os.path.join(self.shots, f"FAILED-{name}.png"))
                        except WebDriverException:
                            pass
        except Exception:
            self.failed.append("setup")
            traceback.print_exc()
        finally:
            self.teardown()
        print(f"screenshots: {self.shots}")
        print(f"dashboard: {len(self.passed)} passed, {len(self.failed)} failed")
        return not self.failed

    def teardown(self):
        if self.driver:
            try:
                self.driver.quit()
            except WebDriverException:
                pass
        if self.server and self.server.poll() is None:
            # Stop what is still running so the executor removes its containers.
            for key, rid in self.runs.items():
                try:
                    run = self.api.ok("GET", f"/api/v1/runs/{rid}")
                    if run["phase"] in ("queued", "running"):
                        self.api.call("PUT", f"/api/v1/runs/{rid}/actions", {"action": "stop"})
                except Exception:
                    pass
            try:
                wait_for("every run to end", lambda: all(
                    self.api.ok("GET", f"/api/v1/runs/{rid}")["phase"] not in ("queued", "running")
                    for rid in self.runs.values()), timeout=60)
            except AssertionError as e:
                print(f"warning: {e}")
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        if self.failed and os.path.exists(os.path.join(self.dir, "dev.log")):
            print("---- flotilla dev log (last 60 lines) ----")
            with open(os.path.join(self.dir, "dev.log"), errors="replace") as f:
                print("".join(f.readlines()[-60:]))
        shutil.rmtree(self.dir, ignore_errors=True)


def main():
    p = argparse.ArgumentParser()
    target = os.environ.get("CARGO_TARGET_DIR") or "target"
    p.add_argument("--bin", default=os.path.join(target, "debug", "flotilla"))
    args = p.parse_args()
    if not os.access(args.bin, os.X_OK):
        print(f"error: {args.bin} is not an executable flotilla binary (build it first)", file=sys.stderr)
        return 2
    for need in ["/usr/bin/chromium", "/usr/bin/chromedriver"]:
        if not os.access(need, os.X_OK):
            print(f"error: {need} is missing (apt-get install chromium chromium-driver)", file=sys.stderr)
            return 2
    return 0 if Test(args).run() else 1


if __name__ == "__main__":
    sys.exit(main())
