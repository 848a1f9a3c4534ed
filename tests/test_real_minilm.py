"""A few steps of the real job: pretrained all-MiniLM-L6-v2 on real GLUE SST-2 (no network)."""

import json
from pathlib import Path

import pytest
import torch


from prune_plugin.cli import main

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (GLUE / "sst2").is_dir(), reason=f"no GLUE data at {GLUE}")]


def test_fine_prune_minilm_on_sst2_then_compress_and_reload(tmp_path):
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prune_plugin.compress import decompress_folder

    out = tmp_path / "run"
    code = main(["fine-prune", str(Path(__file__).resolve().parents[1] / "examples" / "sst2-quick.yaml"),
                 "--dataset", str(GLUE), "--output-dir", str(out), "--max-steps", "6",
                 "--max-train-samples", "96", "--set", "data.max_eval_samples=64",
                 "--set", "pruning.method=movement", "--set", "pruning.warmup_steps=1",
                 "--set", "pruning.cooldown_steps=2", "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["remaining"] == pytest.approx(0.10, abs=1e-4)
    assert metrics["eval_examples"] == 64 and metrics["steps"] == 6

    # The exported plain model loads with the stock class and reproduces the job's accuracy,
    # and so does its compressed (fp32) round trip.
    val = datasets.load_dataset(str(GLUE), "sst2")["validation"].select(range(64))
    tok = AutoTokenizer.from_pretrained(out / "model")
    enc = tok(list(val["sentence"]), padding=True, truncation=True, max_length=64,
              return_tensors="pt")
    labels = torch.tensor(list(val["label"]))
    assert main(["compress", str(out)]) == 0
    decompress_folder(out / "compressed", tmp_path / "plain")
    for folder in (out / "model", tmp_path / "plain"):
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            pred = model(**enc).logits.argmax(-1)
        assert float((pred == labels).double().mean()) == pytest.approx(metrics["eval"]["accuracy"])
