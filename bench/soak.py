"""Fault soak: the scheduled flow, run after run, against a site that misbehaves on a schedule.

A tiny project (three classes of generated images on a local site, 32 px, one epoch) runs
`python -m flows run --force-crawl` — what each scheduled run does — against a real Prefect
server, once per entry of SCHEDULE: the host down for one run, robots.txt answering 500, a storm
of 429s, a slow host, new images appearing, images disappearing, and one run killed with SIGKILL
in the middle of training. Every run has a hard time limit (a run still going then is a hang).

Prints one line per run, then: runs completed, runs failed with a clear reason (the CLI's
`error: flow: ...` line, no traceback as its last word), hangs (must be 0), images lost (an image
the crawl had saved that is gone from data/raw afterwards; must be 0), and the median duration of
a no-change run against its target (10 s on 2 cores).

    python bench/soak.py [--keep] [--run-timeout 900]

Talks only to servers it starts on 127.0.0.1. Takes ~10-20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from clone_like import copy_tracked  # bench/clone_like.py, beside this script
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("red", "green", "blue")
NO_CHANGE_TARGET_S = 10.0


@dataclass
class Site:
    """What the local site serves this run; the bench changes it between runs."""

    images: dict[str, list[int]] = field(
        default_factory=lambda: {c: list(range(24)) for c in CLASSES}
    )
    robots_status: int = 200
    slow_s: float = 0.0
    storm_left: int = 0  # this many more requests get 429 with Retry-After: 1
    lock: threading.Lock = field(default_factory=threading.Lock)

    def png(self, klass: str, number: int) -> bytes:
        """A distinct 48 px image per (class, number): noise tinted by the class."""
        rng = np.random.default_rng(CLASSES.index(klass) * 100_000 + number)
        pixels = rng.integers(0, 120, (48, 48, 3), dtype=np.uint8)
        pixels[..., CLASSES.index(klass)] += 120
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()


def handler_for(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return

        def _send(
            self, status: int, body: bytes, kind: str, extra: dict[str, str] | None = None
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            time.sleep(site.slow_s)
            with site.lock:
                storm = site.storm_left > 0
                site.storm_left -= storm
            if storm:
                self._send(429, b"slow down", "text/plain", {"Retry-After": "1"})
                return
            parts = self.path.strip("/").split("/")
            if self.path == "/robots.txt":
                self._send(site.robots_status, b"User-agent: *\nAllow: /\n", "text/plain")
            elif len(parts) == 2 and parts[0] in CLASSES and parts[1] == "index.html":
                links = "".join(f'<img src="/{parts[0]}/{n}.png">' for n in site.images[parts[0]])
                self._send(200, f"<html><body>{links}</body></html>".encode(), "text/html")
            elif len(parts) == 2 and parts[0] in CLASSES and parts[1].endswith(".png"):
                number = int(parts[1].removesuffix(".png"))
                if number in site.images[parts[0]]:
                    self._send(200, site.png(parts[0], number), "image/png")
                else:
                    self._send(404, b"gone", "text/plain")
            else:
                self._send(404, b"no such page", "text/plain")

    return Handler


class SiteServer:
    """The site on a fixed loopback port, which the bench can take down and bring back."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(site))
        self.port = self.httpd.server_address[1]
        self.thread: threading.Thread | None = None
        self.up()

    def up(self) -> None:
        if self.thread is None:
            if self.httpd.socket.fileno() == -1:
                self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler_for(self.site))
            self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
            self.thread.start()

    def down(self) -> None:
        if self.thread is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread = None


def make_project(where: Path, port: int) -> Path:
    copy_tracked(where)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["classes"] = [
        {"name": c, "seeds": [f"http://127.0.0.1:{port}/{c}/index.html"]} for c in CLASSES
    ]
    params["crawl"].update(
        serve_demo_site=None,
        allow_private_addresses=True,
        max_images_per_class=0,
        min_images_per_class=10,
        timeout_s=2.0,
        retries=2,
        backoff_s=0.2,
        max_retry_after_s=5,
        stall_timeout_s=60,
        deadline_s=300,
    )
    params["clean"]["min_images_per_class"] = 10
    params["train"]["fit"].update(image_size=32, batch_size=16)
    params["train"]["baseline"]["epochs"] = 1
    for section in ("transfer", "compare"):
        if section in params["train"]:
            params["train"][section].update(feature_epochs=1, fine_tune_epochs=1)
    params["flow"].update(crawl_retries=1, crawl_retry_backoff_s=1, dvc_push=False)
    (where / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "soak@example.invalid"],
        ["git", "config", "user.name", "soak"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "soak project"],
    ):
        subprocess.run(args, cwd=where, check=True, capture_output=True)
    return where


def start_prefect(home: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """A real Prefect server, as a deployment has; returns it and its API URL."""
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env={**env, "PREFECT_HOME": str(home)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2):
                return server, api
        except OSError:
            time.sleep(1)
    server.kill()
    raise SystemExit("the Prefect server did not answer /health within 240 s")


def raw_images(project: Path) -> set[str]:
    manifest = project / "data" / "raw" / "manifest.jsonl"
    if not manifest.exists():
        return set()
    return {json.loads(line)["sha256"] for line in manifest.read_text().splitlines() if line}


@dataclass
class Outcome:
    name: str
    verdict: str  # completed | failed clearly | failed unclearly | hang | killed
    seconds: float
    detail: str
    no_change: bool = False


def run_flow(
    project: Path, env: dict[str, str], timeout_s: float, kill_after: Callable[[], bool] | None
) -> tuple[str, float, str]:
    started = time.monotonic()
    log = project.parent / "flow.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows", "run", "--force-crawl"],
            cwd=project,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        while process.poll() is None:
            if time.monotonic() - started > timeout_s:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return "hang", time.monotonic() - started, f"still running after {timeout_s:g} s"
            if kill_after is not None and kill_after():
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return "killed", time.monotonic() - started, "SIGKILL mid-stage (as planned)"
            time.sleep(0.5)
    elapsed = time.monotonic() - started
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if process.returncode == 0:
        return "completed", elapsed, last
    error = next((line for line in reversed(lines) if line.startswith("error: flow:")), None)
    if error is not None and not last.startswith("Traceback"):
        return "failed clearly", elapsed, error
    return "failed unclearly", elapsed, last


def training_started(project: Path, grace_s: float = 5.0) -> Callable[[], bool]:
    """True a few seconds after this run's flow log shows a training stage starting."""
    log = project.parent / "flow.log"
    seen: list[float] = []

    def check() -> bool:
        if not seen and "Running stage 'train-" in log.read_text(errors="replace"):
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] > grace_s

    return check


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--run-timeout", type=float, default=900, help="seconds before a run is a hang"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="crawl2model-soak-"))
    site = Site()
    server = SiteServer(site)
    project = make_project(work / "project", server.port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        TF_CPP_MIN_LOG_LEVEL="2",
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    prefect, api = start_prefect(work / "prefect", env)
    env.update(PREFECT_API_URL=api, PREFECT_HOME=str(work / "prefect"))

    def add_images(n: int) -> Callable[[], None]:
        def change() -> None:
            for klass in CLASSES:
                start = max(site.images[klass]) + 1
                site.images[klass] += list(range(start, start + n))

        return change

    def normal() -> None:
        server.up()
        site.robots_status, site.slow_s, site.storm_left = 200, 0.0, 0

    schedule: list[tuple[str, Callable[[], None], Callable[[], bool] | None, bool]] = [
        ("first run", normal, None, False),
        ("no change", normal, None, True),
        ("robots.txt 500", lambda: setattr(site, "robots_status", 500), None, False),
        ("robots.txt fixed", normal, None, False),
        ("429 storm", lambda: setattr(site, "storm_left", 40), None, False),
        ("slow host (0.3 s a response)", lambda: setattr(site, "slow_s", 0.3), None, False),
        ("host down", server.down, None, False),
        ("host back", normal, None, False),
        ("new images appear", add_images(6), None, False),
        (
            "images disappear",
            lambda: [site.images[c].__delitem__(slice(0, 4)) for c in CLASSES],
            None,
            False,
        ),
        ("new images, killed in training", add_images(6), training_started(project), False),
        ("after the kill", normal, None, False),
        ("no change", normal, None, True),
        ("no change", normal, None, True),
    ]
    outcomes: list[Outcome] = []
    lost = 0
    try:
        for name, change, kill_after, no_change in schedule:
            if name != "first run" and not name.startswith(("robots", "429", "slow", "host down")):
                normal()
            change()
            before = raw_images(project)
            verdict, seconds, detail = run_flow(project, env, args.run_timeout, kill_after)
            after = raw_images(project)
            gone = len(before - after) if after else 0
            lost += gone
            outcomes.append(Outcome(name, verdict, seconds, detail[:150], no_change))
            print(
                f"{len(outcomes):2}. {name:34} {verdict:16} {seconds:7.1f} s  lost {gone}  "
                f"{detail[:90]}",
                flush=True,
            )
            normal()
    finally:
        server.down()
        os.killpg(prefect.pid, signal.SIGKILL)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder kept: {work}")

    counts = {
        v: sum(o.verdict == v for o in outcomes)
        for v in ("completed", "failed clearly", "failed unclearly", "hang", "killed")
    }
    quiet = [o.seconds for o in outcomes if o.no_change and o.verdict == "completed"]
    median = statistics.median(quiet) if quiet else float("nan")
    print(
        f"\nruns {len(outcomes)}: completed {counts['completed']}, failed with a clear reason "
        f"{counts['failed clearly']}, failed unclearly {counts['failed unclearly']}, "
        f"hangs {counts['hang']} (must be 0), killed on purpose {counts['killed']}"
    )
    print(f"images lost: {lost} (must be 0)")
    print(
        f"no-change run: median {median:.1f} s over {len(quiet)} runs; "
        f"target {NO_CHANGE_TARGET_S:g} s -> ratio {median / NO_CHANGE_TARGET_S:.2f} "
        "(below 1 meets it)"
    )
    ok = counts["hang"] == 0 and counts["failed unclearly"] == 0 and lost == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
