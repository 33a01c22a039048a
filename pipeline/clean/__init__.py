"""Clean stage: turn a raw crawl into images a user can trust, with nothing silently lost.

Consumes ``data/raw/manifest.jsonl`` (one row per crawled file: class, path relative to
data/raw, url, page_url, source, license, attribution, fetched_at, ...) and the files it names.

Produces, under ``data/clean/``:

- ``<class>/<sha256>.png`` — every kept image fully decoded, EXIF-rotated, first frame only,
  converted to RGB (transparency onto white, 16-bit scaled down) and shrunk to ``max_side``;
  ``sha256`` is the hash of the decoded pixels, so re-encoded copies share a name.
- ``manifest.jsonl`` — one row per kept image: path (relative to data/clean), class, sha256,
  phash, width, height, group, quality flags and the raw row's provenance.
- ``removed.jsonl`` — one row per dropped raw file with its ``reason`` (missing, corrupt,
  not_an_image, decompression_bomb, too_small, bad_aspect_ratio, quality, exact_duplicate,
  near_duplicate, label_conflict) and the evidence (dup_of, distance, method, inliers...).
- ``groups.jsonl`` — every group of two or more raw files found to be the same picture
  (exact pixels, pHash within ``near_dup_max_distance``, the mirrored image's pHash, or
  ORB + RANSAC geometric verification of embedding neighbours), so split keeps each group on
  one side.
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
                     image; its hashes and thumbnail embedding.
- ``quality.py``   — quality scores (worker) and flags (blurry, dark, ... odd_size).
- ``phash.py``     — pass 1: pHash and mirrored-pHash pairs by multi-index Hamming search.
- ``verify.py``    — pass 2: embedding neighbours confirmed by ORB + RANSAC + correlation.
- ``grouping.py``  — pairs → groups, the representative kept, exact/near duplicates and
                     label conflicts removed, groups.jsonl rows.
- ``report.py``    — manifest/removed/groups/issues files, the report json, the duplicate
                     sheet, pruning files no manifest row names.
- ``workers.py``   — the process pool every worker phase shares.
"""

from pipeline.clean.phash import hamming_pairs, hashes_to_bits
from pipeline.clean.report import write_duplicate_sheet
from pipeline.clean.stage import CleanSummary, clean
from pipeline.clean.verify import embedding_neighbours

__all__ = [
    "CleanSummary",
    "clean",
    "embedding_neighbours",
    "hamming_pairs",
    "hashes_to_bits",
    "write_duplicate_sheet",
]
