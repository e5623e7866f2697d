"""A real byte-level text classification corpus found on this machine: which language is a file written in?

Files are collected from the system's own directories (Python's standard library and site-packages,
C/C++ headers, man pages, shell scripts, documentation, web assets, configuration files), labelled by
extension (shell scripts also by their #! line; man pages are decompressed troff), deduplicated by
content, and split into train / validation / test **by file** with a hash of the content, so the same
file never lands in two splits and the split does not depend on the order files are found in.

    python bench/langid/corpus.py --out /tmp/langid   # writes train/val/test .npz + labels.json

Each split holds the first ``--max-bytes`` bytes of every file (uint8, concatenated) with offsets.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np

LABELS = ["python", "c", "cpp", "shell", "perl", "javascript", "css", "html", "json", "xml", "yaml",
          "markdown", "rst", "troff", "sql"]
EXTENSIONS = {
    ".py": "python", ".c": "c", ".h": "c", ".cpp": "cpp", ".cc": "cpp", ".cxx": "cpp", ".hpp": "cpp",
    ".hh": "cpp", ".sh": "shell", ".bash": "shell", ".pl": "perl", ".pm": "perl", ".js": "javascript",
    ".mjs": "javascript", ".css": "css", ".html": "html", ".htm": "html", ".json": "json", ".xml": "xml",
    ".xsd": "xml", ".xsl": "xml", ".yaml": "yaml", ".yml": "yaml", ".md": "markdown", ".rst": "rst",
    ".sql": "sql",
}
ROOTS = ["/usr", "/etc", "/opt", "/work/venv"]
SKIP_DIRS = {"/proc", "/sys", "/dev", "/tmp", "/work/main", "/var/tmp"}
SHEBANG_SHELLS = (b"#!/bin/sh", b"#!/bin/bash", b"#!/usr/bin/env bash", b"#!/usr/bin/env sh", b"#! /bin/sh",
                  b"#!/bin/dash")
MIN_BYTES = 128  # shorter files say too little to be labelled by a human either


def label_of(path: Path) -> str | None:
    name = path.name
    if name.endswith(".gz") and "/man/" in str(path):
        stem = name[:-3]
        if "." in stem and stem.rsplit(".", 1)[1][:1].isdigit():
            return "troff"
        return None
    return EXTENSIONS.get(path.suffix.lower())


def read_head(path: Path, label: str, max_bytes: int) -> bytes | None:
    try:
        if label == "troff":
            with gzip.open(path, "rb") as f:
                data = f.read(max_bytes)
        else:
            with open(path, "rb") as f:
                data = f.read(max_bytes)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if len(data.strip()) < MIN_BYTES or b"\x00" in data:
        return None
    if label == "troff" and data.startswith(b".so "):  # a man-page alias, one line pointing elsewhere
        return None
    return data


def find_files(roots, per_label_scan: int):
    """Yield (path, label) for candidate files, shell scripts without extension included."""
    seen = Counter()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            if dirpath in SKIP_DIRS or any(dirpath.startswith(s + "/") for s in SKIP_DIRS):
                dirnames[:] = []
                continue
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if path.is_symlink() or not path.is_file():
                    continue
                label = label_of(path)
                if label is None and "bin" in dirpath.split("/")[-1]:
                    try:
                        with open(path, "rb") as f:
                            first = f.read(32)
                    except OSError:
                        continue
                    if first.startswith(SHEBANG_SHELLS):
                        label = "shell"
                if label is not None and seen[label] < per_label_scan:
                    seen[label] += 1
                    yield path, label


def build(roots=ROOTS, max_bytes: int = 4096, max_per_label: int = 1200, seed: int = 0):
    """Return {split: [(bytes, label_index, path)]}: deduplicated, capped per label, split by content hash."""
    by_label: dict[str, list] = {label: [] for label in LABELS}
    hashes = set()
    for path, label in find_files(roots, per_label_scan=20 * max_per_label):
        data = read_head(path, label, max_bytes)
        if data is None:
            continue
        digest = hashlib.sha1(data).digest()
        if digest in hashes:
            continue
        hashes.add(digest)
        by_label[label].append((data, digest, str(path)))
    rng = random.Random(seed)
    splits = {"train": [], "val": [], "test": []}
    for index, label in enumerate(LABELS):
        items = by_label[label]
        rng.shuffle(items)  # a cap keeps files from many directories, not the first ones walked
        for data, digest, path in items[:max_per_label]:
            bucket = digest[0] % 10  # content hash decides the split: 80 / 10 / 10
            split = "test" if bucket == 0 else "val" if bucket == 1 else "train"
            splits[split].append((data, index, path))
    return splits


def save(splits, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        lengths = np.array([len(d) for d, _, _ in items], dtype=np.int64)  # (F,)
        offsets = np.concatenate([[0], np.cumsum(lengths)])  # (F+1,)
        data = np.frombuffer(b"".join(d for d, _, _ in items), dtype=np.uint8)  # (sum bytes,)
        labels = np.array([i for _, i, _ in items], dtype=np.int64)  # (F,)
        np.savez(out / f"{split}.npz", data=data, offsets=offsets, labels=labels,
                 paths=np.array([p for _, _, p in items]))
    (out / "labels.json").write_text(json.dumps(LABELS))


def load(out: Path, split: str):
    """-> (list of uint8 arrays, labels (F,), paths)"""
    z = np.load(out / f"{split}.npz")
    data, offsets = z["data"], z["offsets"]
    files = [data[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    return files, z["labels"], list(z["paths"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-bytes", type=int, default=4096)
    ap.add_argument("--max-per-label", type=int, default=1200)
    args = ap.parse_args()
    splits = build(max_bytes=args.max_bytes, max_per_label=args.max_per_label)
    save(splits, args.out)
    for split, items in splits.items():
        counts = Counter(LABELS[i] for _, i, _ in items)
        print(split, len(items), dict(sorted(counts.items())))


if __name__ == "__main__":
    main()
