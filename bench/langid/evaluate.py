"""Test-split accuracy of a trained byte classifier at several input lengths (PyTorch reference module).

    python bench/langid/evaluate.py --data /tmp/langid --model /tmp/wide --lengths 256,512,1024

Each file is classified from its first L bytes. Adds ``test_accuracy_by_length`` to the checkpoint's
metrics.json and saves the PyTorch test logits at the model's training window (``test_logits.npy``,
``logits_length`` in metrics.json), against which bench/wide.py checks edgeformer's predictions.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.langid import corpus  # noqa: E402
from bench.langid.train import heads_of, predict  # noqa: E402
from converters.wide import ByteClassifierConfig, module  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--lengths", default="256,512,1024")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    config = ByteClassifierConfig.from_json(json.loads((args.model / "config.json").read_text()))
    model = module(config).eval()
    model.load_state_dict(load_file(str(args.model / "model.safetensors")), strict=False)
    files, labels, _ = corpus.load(args.data, "test")
    metrics = json.loads((args.model / "metrics.json").read_text())
    by_length = {}
    for length in sorted(int(x) for x in args.lengths.split(",")):
        logits = predict(model, *heads_of(files, length))  # (F, C)
        by_length[str(length)] = float((logits.argmax(1) == labels).mean())
        if length == config.context_bytes:
            np.save(args.model / "test_logits.npy", logits.astype(np.float32))
            metrics["logits_length"] = length
        print(f"{args.model.name}: first {length} bytes: test accuracy {by_length[str(length)]:.4f}", flush=True)
    metrics["test_accuracy_by_length"] = by_length
    metrics["context_bytes"] = config.context_bytes
    (args.model / "metrics.json").write_text(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
