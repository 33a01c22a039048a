"""The app's throughput against the bare model: what HTTP, multipart and decoding cost.

Starts ``python -m pipeline serve`` on a free 127.0.0.1 port (a separate process, as a user
runs it) in a project that has trained and evaluated models (models/, reports/metrics/models/,
data/split/test.csv), then sends the test images from one client, one request after another:

- one image per request (``POST /predict`` multipart), and
- batches of ``--batch`` images per request;

and compares images/s with two bare baselines on the same, already decoded, images at the same
batch sizes: ``model.predict`` (Keras' batch API, with a large fixed cost per call) and the
compiled ``model(x)`` the app itself calls. app / compiled is the app's own share: HTTP,
multipart parsing, PNG/JPEG decode and resize.

    python bench/serve.py                 # serve.model from params.yaml (best by default)
    python bench/serve.py --model transfer_finetuned --requests 100
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pipeline import paths  # noqa: E402
from pipeline.config import load_params  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_app(params: Path, model: str | None, port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "pipeline", "serve", "--params", str(params)]
    command += ["--port", str(port), *(["--model", model] if model else [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    app = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if app.poll() is not None:
            raise SystemExit(f"the app exited: {app.stderr.read().decode() if app.stderr else ''}")
        try:
            requests.get(f"http://127.0.0.1:{port}/health", timeout=1).raise_for_status()
            return app
        except requests.RequestException:
            time.sleep(0.5)
    app.kill()
    raise SystemExit("the app did not answer /health within 120 s")


def http_rate(url: str, files: list[tuple[str, bytes]], batch: int, requests_count: int) -> float:
    """Images per second over ``requests_count`` sequential requests of ``batch`` images."""
    session = requests.Session()
    sent = 0
    started = None
    for i in range(requests_count + 2):  # the first two warm the connection and the graph
        if i == 2:
            started = time.perf_counter()
        chunk = [files[(i * batch + j) % len(files)] for j in range(batch)]
        upload = [("files", (name, data, "image/png")) for name, data in chunk]
        session.post(f"{url}/predict", files=upload, timeout=120).raise_for_status()
        sent += batch if i >= 2 else 0
    assert started is not None
    return sent / (time.perf_counter() - started)


def bare_rate(
    predict: Callable[[np.ndarray], object], pixels: np.ndarray, batch: int, calls: int
) -> float:
    """Images per second of ``predict`` on decoded pixels, ``batch`` at a time."""
    for _ in range(2):
        predict(pixels[:batch])
    started = time.perf_counter()
    for i in range(calls):
        start = (i * batch) % max(1, len(pixels) - batch)
        predict(pixels[start : start + batch])
    return calls * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--model", help="best | a model name | models/best (default: params)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--requests", type=int, default=200, help="single-image requests")
    args = parser.parse_args()

    from pipeline.dataset import load_images, load_split
    from pipeline.serve import load_classifier

    cfg = load_params(args.params)
    choice = args.model or cfg.serve.model
    classifier = load_classifier(
        choice, paths.MODELS, paths.MODEL_METRICS, cfg.export.metric, cfg.export.higher_is_better
    )
    loaded = classifier.loaded
    bare = {
        "model.predict": lambda x: loaded.model.predict(x, verbose=0),
        "compiled model(x)": classifier.probabilities,  # the app's own inference call
    }
    test = load_split(paths.SPLIT / "test.csv")
    files = [(p.name, p.read_bytes()) for p in test.paths]
    pixels = load_images(test.paths, loaded.image_size)

    port = free_port()
    app = start_app(args.params, args.model, port)
    try:
        url = f"http://127.0.0.1:{port}"
        batches = max(1, args.requests // args.batch)
        plan = [(1, args.requests), (args.batch, batches)]
        app_rates = [http_rate(url, files, batch, count) for batch, count in plan]
    finally:
        app.terminate()
        app.wait(timeout=30)
    bare_rates = {
        name: [bare_rate(fn, pixels, batch, count) for batch, count in plan]
        for name, fn in bare.items()
    }
    print(f"model {loaded.name} ({loaded.image_size}px), {len(files)} test images, one client")
    print(f"{'images/s':<22}{'1 image/request':>17}{f'{args.batch} images/request':>20}")
    print(f"{'app (HTTP)':<22}{app_rates[0]:>17.1f}{app_rates[1]:>20.1f}")
    for name, rates in bare_rates.items():
        print(f"{name:<22}{rates[0]:>17.1f}{rates[1]:>20.1f}")
    for name, rates in bare_rates.items():
        ratios = [app / rate for app, rate in zip(app_rates, rates, strict=True)]
        print(f"{'app / ' + name:<22}{ratios[0]:>17.2f}{ratios[1]:>20.2f}")


if __name__ == "__main__":
    main()
