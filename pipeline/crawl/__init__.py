"""Crawl stage: find and download images for each class, politely, safely and resumably.

Consumes the ``classes`` and ``crawl`` sections of params.yaml (``CrawlConfig``) and the web (or
the bundled demo site, served on 127.0.0.1 while the stage runs). Produces:

- ``data/raw/<class>/<sha256 of bytes>.<ext>``: every image saved, named by content hash, never
  by anything taken from its URL;
- ``data/raw/manifest.jsonl``: one row per selected image (class, source, url, page_url, license,
  attribution, status, content_type, bytes, width, height, sha256, path, fetched_at);
- ``reports/crawl_report.json``: counts per class and per failure kind (a DVC metric), and each
  failed URL with its class and reason (``content_type: text/html``, ``http_404``, ...);
- ``data/raw/.state/``: the crawl state (pages seen, candidates found, every fetch's outcome),
  appended as the crawl goes, so a killed crawl resumes where it stopped and a rerun of a
  finished crawl does no network I/O at all. Failed fetches are final too (with their reason);
  delete ``.state/fetch-*.jsonl`` to try them again.

``refresh=True`` (``python -m pipeline crawl --refresh``; scheduled flow runs) walks the sources
again: seed pages and API listings are fetched anew (robots.txt and host spacing as usual), URLs
not seen before are appended to the class's candidate list, and only those are fetched; images
already fetched are kept, not fetched again, and failures stay recorded. Appending, rather than
re-sorting, means a class at its ``max_images`` cap keeps the images it has and new ones only
fill free places. A refresh killed midway resumes its walk (for 24 hours) when run again with
``refresh``; a plain rerun meanwhile keeps using the last finished list. A refresh that finds
nothing new leaves ``data/raw`` and the report byte for byte as they were (the walk keeps only
page rows whose answer changed), so DVC sees no change.

The stage fails (StageError, after writing what it has, state kept so a rerun resumes) when the
crawl passes ``deadline_s`` or nothing starts or finishes for ``stall_timeout_s`` (the message
names the param and what it waited on), or when a class ends with fewer than
``min_images_per_class`` images (the message names the class, its count and top failures).
robots.txt that cannot be read (5xx, 429, no connection, no complete answer) disallows its host
(RFC 9309); each URL it blocks is reported as ``robots_unreachable: <why>``.

A crawl runs in two phases. *Discovery* turns each class's sources into an ordered candidate list:
``pages`` (seed HTML pages and links followed level by level to ``max_depth``), ``urls`` (a text
or CSV file of image URLs), ``wikimedia_commons`` and ``openverse`` (their public search APIs).
*Fetching* downloads candidates in that order until the class has ``max_images`` distinct images.
Both phases run every request through one scheduler that keeps ``concurrency`` requests in flight
over all hosts, at most ``max_per_host`` per host, spaced by the larger of ``per_host_delay_s``
and robots.txt's Crawl-delay, and reschedules (instead of sleeping on) retries and Retry-After.
Requests go through one urllib3 connection pool (keep-alive per host).

Because candidates are ordered and selection is "the first N distinct images in order", the
manifest does not depend on timing: ``crawl`` in one process and ``crawl`` split over classes and
host shards followed by ``merge_shards`` write the same manifest (apart from ``fetched_at``).

Where things live (each module's docstring says what it consumes and produces):

    stage.py        crawl(), discover(), merge_shards(), CrawlSummary: wiring, one-line summary
    shards.py       HostShard, plan() -> CrawlPlan, run one discovery / fetch job, the merge
    discovery.py    phase 1: sources -> ordered candidates per class; the list's fingerprint
    sources/        pages.py (HTML), url_list.py, wikimedia.py, openverse.py: parsing answers
    fetch.py        phase 2: download, check (type, decode, size), save by content hash
    manifest.py     selection of the first N distinct images, manifest.jsonl, crawl report
    scheduler.py    job queues per host, thread pool, retries, redirects
    limits.py       the crawl's deadline and no-progress watchdog (CrawlStopped)
    politeness.py   robots.txt, per-host gates (spacing, concurrency), Retry-After, X-Robots-Tag
    transport.py    the urllib3 client: one GET, streamed body with a size cap, address checks
    watchdog.py     a time limit on each whole answer: a dribbling server's socket is cut
    state.py        resume state on disk (.state/): logs, candidate lists, refresh walks
    urls.py         canonical URLs, tracking-parameter stripping, {demo} mapping, host shards
    demo_server.py  serving demo/site on 127.0.0.1 during the crawl
"""

from pipeline.crawl.shards import (
    CrawlPlan,
    DiscoveryJob,
    FetchJob,
    HostShard,
    plan,
    run_discovery_job,
    run_fetch_job,
    run_merge,
)
from pipeline.crawl.stage import CrawlSummary, crawl, discover, merge_shards

__all__ = [
    "CrawlPlan",
    "CrawlSummary",
    "DiscoveryJob",
    "FetchJob",
    "HostShard",
    "crawl",
    "discover",
    "merge_shards",
    "plan",
    "run_discovery_job",
    "run_fetch_job",
    "run_merge",
]
