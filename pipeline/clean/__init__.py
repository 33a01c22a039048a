"""Clean stage: turn a raw crawl into images a user can trust, with nothing silently lost.

Consumes ``data/raw/manifest.jsonl`` (one row per crawled file: class, path relative to
data/raw, url, page_url, source, license, attribution, fetched_at, ...) and the files it names.

Produces, under ``data/clean/``:

- ``<class>/<sha256>.<jpg|png>`` — every kept image fully decoded, EXIF-rotated, first frame
  only, converted to RGB (transparency onto white, 16-bit scaled down) and shrunk to
  ``max_side``; JPEG for a JPEG source and PNG otherwise (``output_format: auto``); ``sha256`` is
  the hash of the decoded pixels, so re-encoded copies share a name.
- ``manifest.jsonl`` — one row per kept image: path (relative to data/clean), class, sha256,
  phash, width, height, group, quality flags and the raw row's provenance.
- ``removed.jsonl`` — one row per dropped raw file with its ``reason`` (missing, corrupt,
  not_an_image, decompression_bomb, too_small, bad_aspect_ratio, quality, exact_duplicate,
  near_duplicate, label_conflict) and the evidence (dup_of, distance, method, inliers...).
- ``groups.jsonl`` — every group of two or more raw files found to be the same picture
  (exact pixels, pHash within ``near_dup_max_distance``, the mirrored image's pHash, or
  ORB + RANSAC geometric verification of embedding neighbours), so split keeps each group on
  one side. A group is every chain of matches (or, ``duplicate_groups: star``, only images
  matched directly to the kept one).
- ``issues.csv`` — the per-image quality table (brightness, entropy, sharpness, flags).
- ``.analysis.jsonl`` — per-image results keyed by file and params, so a killed or re-tuned
  run reuses decoding and hashing instead of redoing it.

and ``reports/clean_report.json`` (a DVC metric: counts per class and reason) with
``reports/clean_duplicates.png`` (a DVC plot of the largest duplicate groups).

Where each behaviour lives:

- ``stage.py``     — ``clean()`` top to bottom, ``CleanSummary``, reading the raw manifest,
                     per-image verdicts.
- ``records.py``   — the typed rows passed between the modules (RawImage, Analysis,
                     DecodedImage, ImageRecord, Match, Removal).
- ``analysis.py``  — analysing every raw file once, resuming from ``.analysis.jsonl``.
- ``decode.py``    — (worker) decode, validate (missing, corrupt, not_an_image,
                     decompression_bomb, too_small, bad_aspect_ratio), normalise and write one
                     image; its hashes; JPEGs decoded at reduced scale, memory bounded.
- ``embed.py``     — (worker) the view embeddings pass 2 searches: trimmed, blurred thumbnails
                     of the whole image and its centre, and of its mirror.
- ``quality.py``   — quality scores (worker) and flags (blurry, dark, ... odd_size).
- ``phash.py``     — pass 1: pHash and mirrored-pHash pairs by multi-index Hamming search.
- ``neighbours.py`` — pass 2's proposal: nearest neighbours per view in a faiss index.
- ``describe.py``  — (worker) pass 2's per-image half: ORB keypoints (and the mirror's), once
                     per image, in a per-run file store the verify workers read.
- ``rounds.py``    — pass 2's rounds (stage process): candidate pairs, which image of a
                     mirrored pair is mirrored, rounds with transitivity, the verdict log,
                     describe and verify tasks.
- ``verify.py``    — (worker) pass 2: neighbours confirmed by ORB + RANSAC (similarity or
                     homography), overlap of both pictures, and median tile correlation once
                     aligned; or, on low-texture pictures, by dense ECC alignment
                     (``aligned.py``).
- ``kept.py``      — (worker) the byte-bounded LRU store verify.py and describe.py keep in,
                     emptied when a worker's run changes.
- ``verdicts.py``  — pass 2's verdicts kept in ``.verdicts.jsonl``: a rerun verifies only
                     pairs it has not judged.
- ``grouping.py``  — pairs → groups, the representative kept, exact/near duplicates and
                     label conflicts removed, groups.jsonl rows.
- ``report.py``    — manifest/removed/groups/issues files, the report json, the duplicate
                     sheet, pruning files no manifest row names.
- ``workers.py``   — the process pool every worker phase shares, or a Dask cluster
                     (``clean.dask_address``), sized by cores and by memory.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.clean.neighbours import view_neighbours
    from pipeline.clean.phash import hamming_pairs, hashes_to_bits
    from pipeline.clean.report import write_duplicate_sheet
    from pipeline.clean.stage import CleanSummary, clean

# Imported on first use (PEP 562): a worker process unpickling decode.analyse_batch imports
# this package, and should not pay for the stage's imports (faiss, SciPy's graphs, matplotlib).
_EXPORTS = {
    "CleanSummary": "pipeline.clean.stage",
    "clean": "pipeline.clean.stage",
    "hamming_pairs": "pipeline.clean.phash",
    "hashes_to_bits": "pipeline.clean.phash",
    "view_neighbours": "pipeline.clean.neighbours",
    "write_duplicate_sheet": "pipeline.clean.report",
}

__all__ = [
    "CleanSummary",
    "clean",
    "hamming_pairs",
    "hashes_to_bits",
    "view_neighbours",
    "write_duplicate_sheet",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
