"""Model files converted on another machine (x86-64) load and run unchanged here.

Runs when EDGEFORMER_PORTABLE_DIR points at the output of tests/aarch64/make_portable.py (the
aarch64 emulation stage sets it); skipped otherwise.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import edgeformer

ART = os.environ.get("EDGEFORMER_PORTABLE_DIR")
pytestmark = pytest.mark.skipif(not ART, reason="EDGEFORMER_PORTABLE_DIR not set (see tests/aarch64/run.sh)")
ENTRIES = json.loads((Path(ART) / "manifest.json").read_text()) if ART else []


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["model"] for e in ENTRIES])
def test_outputs_match_the_converting_machine(entry):
    model = edgeformer.load(Path(ART) / entry["model"], threads=2)
    with np.load(Path(ART) / entry["data"]) as data:
        feeds = {k[5:]: data[k] for k in data.files if k.startswith("feed_") and k[5:] in {s.name for s in model.inputs}}
        expected = {k[4:]: data[k] for k in data.files if k.startswith("out_")}
    got = model.run(feeds)
    assert set(got) == set(expected)
    valid = feeds["attention_mask"].astype(bool) if "attention_mask" in feeds else None
    for name, want in expected.items():
        if "atol" in entry:
            np.testing.assert_allclose(got[name], want, atol=entry["atol"], rtol=0, err_msg=name)
            continue
        a, b = (got[name][valid], want[valid]) if got[name].ndim == 3 and valid is not None else (got[name], want)
        cosine = np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)
        assert cosine.min() >= entry["min_cosine"], (name, float(cosine.min()))
        assert cosine.mean() >= entry["mean_cosine"], (name, float(cosine.mean()))
