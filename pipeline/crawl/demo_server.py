"""The bundled demo site, served on 127.0.0.1 while a crawl runs.

Consumes ``crawl.serve_demo_site`` (a folder) and the classes' sources; produces the UrlMap that
turns stored "{demo}/..." URLs into live ones on the server's free port, and back.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import ClassConfig, StageError
from pipeline.crawl.urls import DEMO, UrlMap


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    protocol_version = (
        "HTTP/1.1"  # keep-alive, so the demo crawl reuses connections like a real one
    )

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_directory(directory: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``directory`` over HTTP on ``host`` and a free port; yield the base URL.

    Raises StageError if the directory does not exist.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise StageError(
            f"crawl.serve_demo_site: {directory} is not a directory "
            "(run `python demo/build_site.py`, or set crawl.serve_demo_site: null)"
        )
    handler = functools.partial(_QuietHandler, directory=str(directory.resolve()))
    server = http.server.ThreadingHTTPServer((host, 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="demo-site", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _uses_demo(classes: Sequence[ClassConfig]) -> bool:
    if any(seed.startswith(DEMO) for klass in classes for seed in klass.seeds):
        return True
    return any(
        DEMO in Path(klass.image_urls).read_text(encoding="utf-8", errors="replace")
        for klass in classes
        if klass.image_urls and Path(klass.image_urls).exists()
    )


@contextlib.contextmanager
def url_map(classes: Sequence[ClassConfig], demo_site: Path | None) -> Iterator[UrlMap]:
    """Yield the crawl's UrlMap, serving ``demo_site`` meanwhile when it is set.

    Raises StageError when a class uses "{demo}" URLs but no demo site is configured.
    """
    if _uses_demo(classes) and demo_site is None:
        raise StageError("classes: seeds use {demo} but crawl.serve_demo_site is not set")
    if demo_site is None:
        yield UrlMap()
        return
    with serve_directory(demo_site) as base:
        yield UrlMap(base)
