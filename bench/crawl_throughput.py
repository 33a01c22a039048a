"""Crawl throughput against many slow hosts: our crawler vs a sequential requests.get loop.

Starts 20 local HTTP servers on 127.0.0.2 ... 127.0.0.21 (distinct hosts on Linux), each adding
50 ms of latency to every reply, serving 2,000 distinct small PNGs between them, in a separate
process (so the servers do not share the crawler's GIL). Then measures, in the same run:

- baseline: a naive loop, ``requests.get(url)`` one after another (on the first
  ``--sequential-images`` URLs; its rate does not depend on how many it fetches);
- ours: ``pipeline.crawl.crawl`` on the whole URL list (the ``urls`` source), with its
  robots.txt checks, per-host limits, decode checks and state logging all switched on;
- img2dataset, if ``--img2dataset PATH`` names its executable (install it in a separate venv).

It prints images/s for each and the ratio, plus the two measurements behind the crawler's own
code (urllib3 instead of requests, its own state-log writer), and asserts the servers never saw
more than ``--max-per-host`` requests in flight per host.

    python bench/crawl_throughput.py                  # about 1 minute on 2 cores
    python bench/crawl_throughput.py --images 10000 --concurrency 64 --max-per-host 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import requests
import urllib3

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from httpservers import LocalServer, png_bytes  # noqa: E402

from pipeline.config import CrawlConfig  # noqa: E402
from pipeline.crawl import crawl  # noqa: E402
from pipeline.crawl.state import StateLog  # noqa: E402
from pipeline.files import append_jsonl, read_jsonl  # noqa: E402


def serve(args: argparse.Namespace) -> int:
    """Child process: run the servers, print their URLs, print per-host peaks when told to."""
    with ExitStack() as stack:
        servers = [
            stack.enter_context(LocalServer(host=f"127.0.0.{2 + i}", latency_s=args.latency))
            for i in range(args.hosts)
        ]
        urls = [
            servers[i % args.hosts].add(f"/img/{i}.png", png_bytes(size=32, seed=i))
            for i in range(args.images)
        ]
        print(json.dumps(urls), flush=True)
        for line in sys.stdin:
            if line.strip() == "reset":
                for server in servers:
                    server.peak_in_flight.clear()
            elif line.strip() == "stats":
                peaks = [max(s.peak_in_flight.values(), default=0) for s in servers]
                print(json.dumps(peaks), flush=True)
            else:
                break
    return 0


def client_cpu_ms(urls: list[str]) -> tuple[float, float]:
    """CPU milliseconds per GET of a requests.Session and of a urllib3.PoolManager."""
    session = requests.Session()
    started = time.process_time()
    for url in urls:
        with session.get(url, stream=True, allow_redirects=False, timeout=10) as response:
            b"".join(response.iter_content(65536))
    requests_ms = (time.process_time() - started) * 1000 / len(urls)
    pool = urllib3.PoolManager(retries=False, timeout=10)
    started = time.process_time()
    for url in urls:
        response = pool.request("GET", url, preload_content=False, redirect=False)
        b"".join(response.stream(65536))
        response.release_conn()
    return requests_ms, (time.process_time() - started) * 1000 / len(urls)


def state_log_ratio(work: Path, rows: int = 300) -> tuple[float, float]:
    """Rows/s of files.append_jsonl (fsync per row) and of crawl.StateLog (flush per row)."""
    row = {"class": "c", "url": "http://example.org/" + "x" * 80, "ok": True, "sha256": "0" * 64}
    started = time.perf_counter()
    for _ in range(rows):
        append_jsonl(work / "fsync.jsonl", row)
    fsync_rate = rows / (time.perf_counter() - started)
    log = StateLog(work / "statelog.jsonl")
    started = time.perf_counter()
    for _ in range(rows):
        log.append(row)
    log.close()
    return fsync_rate, rows / (time.perf_counter() - started)


def sequential(urls: list[str]) -> float:
    """Images per second of a plain requests.get loop."""
    started = time.perf_counter()
    for url in urls:
        response = requests.get(url, timeout=10)
        response.raise_for_status()
    return len(urls) / (time.perf_counter() - started)


def ours(urls: list[str], work: Path, concurrency: int, max_per_host: int) -> tuple[float, int]:
    """Images per second of our crawl stage, and how many it saved."""
    listing = work / "urls.txt"
    listing.write_text("\n".join(urls) + "\n")
    cfg = CrawlConfig.model_validate(
        {
            "classes": [{"name": "bench", "image_urls": str(listing)}],
            "allow_private_addresses": True,
            "concurrency": concurrency,
            "max_per_host": max_per_host,
            "max_images_per_class": 0,
        }
    )
    out = work / "raw"
    started = time.perf_counter()
    crawl(cfg, out, work / "report.json", progress=False)
    elapsed = time.perf_counter() - started
    saved = len(read_jsonl(out / "manifest.jsonl"))
    return len(urls) / elapsed, saved


def img2dataset(
    executable: str, urls: list[str], work: Path, processes: int, threads: int
) -> float:
    listing = work / "i2d_urls.txt"
    listing.write_text("\n".join(urls) + "\n")
    out = work / "i2d_out"
    started = time.perf_counter()
    subprocess.run(
        [
            executable,
            f"--url_list={listing}",
            "--input_format=txt",
            f"--output_folder={out}",
            "--output_format=files",
            f"--processes_count={processes}",
            f"--thread_count={threads}",
            "--resize_mode=no",
            "--enable_wandb=False",
            "--disallowed_header_directives=[]",
        ],
        check=True,
        capture_output=True,
    )
    elapsed = time.perf_counter() - started
    saved = len(list(out.rglob("*.png"))) + len(list(out.rglob("*.jpg")))
    if saved < len(urls) * 0.9:
        raise RuntimeError(f"img2dataset saved only {saved} of {len(urls)} images")
    return len(urls) / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per reply")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-per-host", type=int, default=2)
    parser.add_argument("--sequential-images", type=int, default=300)
    parser.add_argument("--img2dataset", help="path to an img2dataset executable (optional)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args)

    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", *(argv if argv is not None else sys.argv[1:])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert child.stdin is not None and child.stdout is not None
    work = Path(tempfile.mkdtemp(prefix="crawl-bench-"))
    try:
        urls = json.loads(child.stdout.readline())
        seq_rate = sequential(urls[: args.sequential_images])
        child.stdin.write("reset\n")  # the baseline's hits must not count against our crawl
        child.stdin.flush()
        our_rate, saved = ours(urls, work, args.concurrency, args.max_per_host)
        child.stdin.write("stats\n")
        child.stdin.flush()
        peak = max(json.loads(child.stdout.readline()))
        i2d_rate = None
        if args.img2dataset:
            i2d_rate = img2dataset(args.img2dataset, urls, work, 2, args.concurrency // 2)
        fsync_rate, log_rate = state_log_ratio(work)
        requests_ms, urllib3_ms = client_cpu_ms(urls[:200])
    finally:
        child.stdin.write("quit\n")
        child.stdin.close()
        child.wait()
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"{args.images} images on {args.hosts} hosts, {args.latency * 1000:.0f} ms latency, "
        f"concurrency {args.concurrency}, max {args.max_per_host} per host"
    )
    print(f"sequential requests.get loop : {seq_rate:8.1f} images/s")
    print(f"crawl2model crawl            : {our_rate:8.1f} images/s ({saved} saved)")
    print(f"ratio crawl / sequential     : {our_rate / seq_rate:8.1f}x  (target >= 8x)")
    if i2d_rate is not None:
        print(f"img2dataset                  : {i2d_rate:8.1f} images/s")
        print(f"ratio crawl / img2dataset    : {our_rate / i2d_rate:8.2f}x")
    print(f"peak requests in flight on one host: {peak} (limit {args.max_per_host})")
    print(
        f"client CPU per GET: requests.Session {requests_ms:.2f} ms, urllib3.PoolManager "
        f"{urllib3_ms:.2f} ms ({requests_ms / urllib3_ms:.1f}x): why the crawl uses urllib3"
    )
    print(
        f"state log: files.append_jsonl {fsync_rate:.0f} rows/s, crawl.StateLog {log_rate:.0f} "
        f"rows/s ({log_rate / fsync_rate:.0f}x): why the crawl keeps its own log writer"
    )
    result = {
        "sequential_ips": seq_rate,
        "crawl_ips": our_rate,
        "ratio": our_rate / seq_rate,
        "img2dataset_ips": i2d_rate,
        "peak_per_host": peak,
    }
    print(json.dumps(result))
    assert saved == args.images, f"saved {saved} of {args.images}"
    assert peak <= args.max_per_host, f"a host saw {peak} requests at once"
    return 0


if __name__ == "__main__":
    sys.exit(main())
