"""Build the bundled demo web site from Fashion-MNIST (Debian package dataset-fashion-mnist).

Consumes /usr/share/datasets/fashion-mnist/train-{images,labels}-*.gz (idx format) and produces a
static site the crawl stage reaches over real HTTP:

    <out>/index.html                      links to every class
    <out>/robots.txt                      disallows /private/
    <out>/<class>/index.html, page-N.html paginated galleries (relative links, <img>, srcset,
                                          <a href> to image files, og:image)
    <out>/<class>/img/NNNN.png            28×28 product photos (plus 56×56 "2x" variants)
    <out>/private/index.html              images a polite crawler must never fetch

and the dirt a real crawl meets: byte-identical duplicates under a second URL, pixel-identical
re-encodes, near duplicates (resized, JPEG re-encoded), a corrupt (truncated) PNG, an HTML page
behind an ``.jpg`` link, a tiny icon on every page and broken links.

    python demo/build_site.py              # 3 demo classes × 200 (+ 3 × 60 footwear) → demo/site
                                           # (committed, < 1 MB)
    python demo/build_site.py --full       # 10 classes × 3000 → build/demo-site-full (benchmarks)

Output is deterministic: the same dataset gives byte-identical files.
"""

from __future__ import annotations

import argparse
import gzip
import html
import io
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DATASET_DIR = Path("/usr/share/datasets/fashion-mnist")
# Fashion-MNIST label index → class name used in params.yaml.
CLASS_NAMES = (
    "t_shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
# The demo learns three look-alike tops at a crawl's typical size (a couple of hundred images per
# class), where pretrained features matter; the site also sells footwear (fewer images), which the
# crawl tests use and the demo's seeds never reach.
DEMO_CLASSES = ("t_shirt_top", "pullover", "shirt")
DEMO_PER_CLASS = 200
OTHER_CLASSES = ("sandal", "sneaker", "ankle_boot")
OTHER_PER_CLASS = 60
IMAGES_PER_PAGE = 48
SRCSET_EVERY = 7  # every 7th image also has a 56 px "2x" variant offered through srcset
LINK_ONLY_EVERY = 11  # every 11th image is reachable only through <a href>, not <img>
PRIVATE_IMAGES = 12  # images under /private/, which robots.txt disallows
LICENSE_URL = "https://opensource.org/licenses/MIT"
ATTRIBUTION = "Zalando SE (Fashion-MNIST, github.com/zalandoresearch/fashion-mnist)"


@dataclass(frozen=True)
class SiteStats:
    classes: int
    images: int
    files: int
    bytes: int

    def __str__(self) -> str:
        return (
            f"{self.classes} classes, {self.images} product images, "
            f"{self.files} files, {self.bytes / 1e6:.2f} MB"
        )


def read_idx(images_gz: Path, labels_gz: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N,28,28], labels uint8 [N]) from Fashion-MNIST idx files.

    Raises FileNotFoundError naming the file and the Debian package that provides it.
    """
    for path in (images_gz, labels_gz):
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: install it with `apt-get install dataset-fashion-mnist`"
            )
    with gzip.open(images_gz, "rb") as fh:
        magic, count, rows, cols = struct.unpack(">IIII", fh.read(16))
        if magic != 2051:
            raise ValueError(f"{images_gz}: not an idx3 image file (magic {magic})")
        images = np.frombuffer(fh.read(), dtype=np.uint8).reshape(count, rows, cols)
    with gzip.open(labels_gz, "rb") as fh:
        magic, count = struct.unpack(">II", fh.read(8))
        if magic != 2049:
            raise ValueError(f"{labels_gz}: not an idx1 label file (magic {magic})")
        labels = np.frombuffer(fh.read(), dtype=np.uint8)
    return images, labels


def png_bytes(image: Image.Image, compress_level: int = 9) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level, optimize=False)
    return buf.getvalue()


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def tiny_icon() -> bytes:
    icon = Image.new("L", (8, 8), 0)
    icon.paste(255, (2, 2, 6, 6))
    return png_bytes(icon)


def page_html(title: str, body: list[str], og_image: str | None = None) -> str:
    og = f'  <meta property="og:image" content="{og_image}">\n' if og_image else ""
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n  <meta charset="utf-8">\n'
        f"  <title>{html.escape(title)}</title>\n{og}"
        # machine-readable licence and author: the crawler copies them into its manifest
        f'  <link rel="license" href="{LICENSE_URL}">\n'
        f'  <meta name="author" content="{ATTRIBUTION}">\n'
        "</head>\n<body>\n"
        '  <header><img src="../icons/logo.png" alt="logo" width="8" height="8"> '
        '<a href="../index.html">All products</a></header>\n'
        f"  <h1>{html.escape(title)}</h1>\n" + "\n".join(f"  {line}" for line in body) + "\n"
        "  <footer>Photos: Zalando Research, Fashion-MNIST (MIT licence).</footer>\n"
        "</body>\n</html>\n"
    )


def write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def build_class(out: Path, name: str, images: np.ndarray, pages_dirt: bool) -> int:
    """Write one class's images and gallery pages; return how many product images it has."""
    class_dir = out / name
    entries: list[str] = []  # HTML snippets in page order
    for i, pixels in enumerate(images):
        image = Image.fromarray(pixels, mode="L")
        stem = f"{i:04d}"
        write(class_dir / "img" / f"{stem}.png", png_bytes(image))
        alt = f"{name.replace('_', ' ')} {i}"
        if i % LINK_ONLY_EVERY == LINK_ONLY_EVERY - 1:
            entries.append(f'<p><a href="img/{stem}.png">Download {html.escape(alt)}</a></p>')
        elif i % SRCSET_EVERY == 0:
            write(class_dir / "img" / f"{stem}-2x.png", png_bytes(image.resize((56, 56))))
            entries.append(
                f'<a href="img/{stem}.png"><img src="img/{stem}.png" '
                f'srcset="img/{stem}.png 1x, img/{stem}-2x.png 2x" alt="{html.escape(alt)}"></a>'
            )
        else:
            entries.append(f'<img src="img/{stem}.png" alt="{html.escape(alt)}">')

    if pages_dirt:
        first = Image.fromarray(images[0], mode="L")
        second = Image.fromarray(images[1], mode="L")
        third = Image.fromarray(images[2], mode="L")
        dirt = {
            # the same bytes under a second URL: the crawler stores one file
            "dup-0000.png": (class_dir / "img" / "0000.png").read_bytes(),
            # the same pixels, different bytes: only a decoded-pixel hash sees it
            "reencoded-0001.png": png_bytes(second, compress_level=1),
            # near duplicates: resized and lossy re-encoded
            "resized-0002.png": png_bytes(third.resize((36, 36), Image.Resampling.BILINEAR)),
            "lossy-0000.jpg": jpeg_bytes(first, quality=70),
            # a PNG cut off halfway through: the crawler's decode check must refuse it
            "corrupt.png": png_bytes(first)[: len(png_bytes(first)) // 2],
            # an HTML error page behind an image-looking link
            "photo.jpg": b"<!doctype html><html><body>Image temporarily unavailable</body></html>",
        }
        for filename, data in dirt.items():
            write(class_dir / "img" / filename, data)
        dirt_tags = [f'<img src="img/{filename}" alt="extra">' for filename in dirt]
        dirt_tags.append('<img src="img/missing.png" alt="broken image link">')
        # spread over the gallery, so a crawl capped below the class size still meets them all
        for n, tag in enumerate(dirt_tags):
            entries.insert(5 + n * 37, tag)

    page_count = max(1, -(-len(entries) // IMAGES_PER_PAGE))
    for page in range(1, page_count + 1):
        chunk = entries[(page - 1) * IMAGES_PER_PAGE : page * IMAGES_PER_PAGE]
        nav = []
        if page > 1:
            prev = "index.html" if page == 2 else f"page-{page - 1}.html"
            nav.append(f'<a href="{prev}">Previous</a>')
        # numbered links to every page keep the whole gallery within one hop of its index
        nav += [
            f'<a href="{"index.html" if n == 1 else f"page-{n}.html"}">{n}</a>'
            for n in range(1, page_count + 1)
            if n != page
        ]
        if page < page_count:
            nav.append(f'<a href="page-{page + 1}.html">Next</a>')
            nav.append(f'<a href="./page-{page + 1}.html#top">Next (again)</a>')  # duplicate link
        if pages_dirt and page == page_count:
            nav.append(f'<a href="page-{page_count + 1}.html">More (broken link)</a>')
        body = [f"<nav>{' | '.join(nav)}</nav>", '<div class="gallery">', *chunk, "</div>"]
        filename = "index.html" if page == 1 else f"page-{page}.html"
        og = "img/0000.png" if page == 1 else None
        title = f"{name.replace('_', ' ').title()} — page {page} of {page_count}"
        write(class_dir / filename, page_html(title, body, og_image=og))
    return len(images)


def build_site(
    out: Path,
    class_names: tuple[str, ...],
    per_class: int,
    dataset: Path,
    other_per_class: dict[str, int] | None = None,
) -> SiteStats:
    """Write the whole site into ``out`` (replacing it): ``per_class`` images of each of
    ``class_names``, plus ``other_per_class`` (class → images) more classes; return what was
    written.

    Raises FileNotFoundError if the Fashion-MNIST files are missing.
    """
    images, labels = read_idx(
        dataset / "train-images-idx3-ubyte.gz", dataset / "train-labels-idx1-ubyte.gz"
    )
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write(out / "icons" / "logo.png", tiny_icon())
    write(out / "robots.txt", "User-agent: *\nDisallow: /private/\n")
    total = 0
    links = []
    sizes = {name: per_class for name in class_names} | (other_per_class or {})
    class_names = tuple(sizes)
    for name, count in sizes.items():
        label = CLASS_NAMES.index(name)
        chosen = images[labels == label]
        if len(chosen) < count + PRIVATE_IMAGES:
            raise ValueError(f"only {len(chosen)} images of {name}, asked for {count}")
        total += build_class(out, name, chosen[:count], pages_dirt=True)
        links.append(f'<li><a href="{name}/index.html">{name.replace("_", " ").title()}</a></li>')
    # /private/ holds more photos of the first class; robots.txt forbids them, so a crawl that
    # saves any of them ignored robots.txt.
    private = images[labels == CLASS_NAMES.index(class_names[0])][-PRIVATE_IMAGES:]
    private_body = []
    for i, pixels in enumerate(private):
        write(out / "private" / f"{i:04d}.png", png_bytes(Image.fromarray(pixels, mode="L")))
        private_body.append(f'<img src="{i:04d}.png" alt="private {i}">')
    write(out / "private" / "index.html", page_html("Staff only", private_body))
    links.append('<li><a href="private/index.html">Staff only</a></li>')
    for name in class_names:  # the private area is linked from every class, as real sites do
        index = out / name / "index.html"
        text = index.read_text(encoding="utf-8")
        text = text.replace("</nav>", ' | <a href="../private/index.html">Staff</a></nav>', 1)
        text = text.replace(
            '<div class="gallery">',
            '<div class="gallery">\n  <img src="../private/0000.png" alt="staff pick">',
            1,
        )
        write(index, text)
    index_body = ["<ul>", *links, "</ul>"]
    write(out / "index.html", page_html("Tops, footwear and more", index_body).replace("../", ""))
    files = [p for p in out.rglob("*") if p.is_file()]
    return SiteStats(
        classes=len(class_names),
        images=total,
        files=len(files),
        bytes=sum(p.stat().st_size for p in files),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="10 classes × 3000 images")
    parser.add_argument(
        "--out",
        type=Path,
        help="output folder (default: demo/site, or build/demo-site-full with --full)",
    )
    parser.add_argument("--per-class", type=int, help="product images per class")
    parser.add_argument("--dataset", type=Path, default=DATASET_DIR)
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    other: dict[str, int] = {}
    if args.full:
        out = args.out or root / "build" / "demo-site-full"
        classes, per_class = CLASS_NAMES, args.per_class or 3000
    else:
        out = args.out or root / "demo" / "site"
        classes, per_class = DEMO_CLASSES, args.per_class or DEMO_PER_CLASS
        other = dict.fromkeys(OTHER_CLASSES, OTHER_PER_CLASS)
    try:
        stats = build_site(out, classes, per_class, args.dataset, other)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{out}: {stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
