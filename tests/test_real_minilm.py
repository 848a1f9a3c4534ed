"""A few steps of the real job: pretrained all-MiniLM-L6-v2 on real GLUE SST-2 (no network)."""

import json
from pathlib import Path

import pytest
import torch


from prune_plugin.cli import main

from .models import EXAMPLES

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SQUAD = SHARED / "squad"
pytestmark = pytest.mark.slow


def test_main_job_fine_prunes_minilm_on_its_shipped_sst2_then_compress_and_reload(tmp_path):
    # The README's main job, shortened: its data ships with the project, so no ../shared.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prune_plugin.compress import decompress_folder

    out = tmp_path / "run"
    code = main(["fine-prune", str(EXAMPLES / "sst2-quick.yaml"),
                 "--output-dir", str(out), "--max-steps", "6",
                 "--max-train-samples", "96", "--set", "data.max_eval_samples=64",
                 "--set", "pruning.warmup_steps=1",
                 "--set", "pruning.cooldown_steps=2", "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["remaining"] == pytest.approx(0.10, abs=1e-4)
    assert metrics["eval_examples"] == 64 and metrics["steps"] == 6
    resolved = (out / "config.resolved.yaml").read_text()
    assert "method: movement" in resolved and "score_init: magnitude" in resolved

    # The exported plain model loads with the stock class and reproduces the job's accuracy,
    # and so does its compressed (fp32) round trip. The shipped labels are names.
    rows = [json.loads(line) for line in
            (EXAMPLES / "data" / "sst2" / "validation.jsonl").read_text().splitlines()][:64]
    tok = AutoTokenizer.from_pretrained(out / "model")
    enc = tok([r["sentence"] for r in rows], padding=True, truncation=True, max_length=64,
              return_tensors="pt")
    label2id = AutoModelForSequenceClassification.from_pretrained(out / "model").config.label2id
    labels = torch.tensor([label2id[r["label"]] for r in rows])
    assert main(["compress", str(out)]) == 0
    decompress_folder(out / "compressed", tmp_path / "plain")
    for folder in (out / "model", tmp_path / "plain"):
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            pred = model(**enc).logits.argmax(-1)
        assert float((pred == labels).double().mean()) == pytest.approx(metrics["eval"]["accuracy"])


@pytest.mark.skipif(not (SQUAD / "dev-v1.1.json").is_file(), reason=f"no SQuAD data at {SQUAD}")
def test_fine_prune_minilm_on_squad_and_reload(tmp_path):
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from prune_plugin.integrations.job import question_answering as qa
    from prune_plugin.integrations.job.datasets import load_raw

    out = tmp_path / "run"
    code = main(["fine-prune", str(EXAMPLES / "squad-dev.yaml"), "--dataset", str(SQUAD),
                 "--output-dir", str(out), "--max-steps", "3", "--max-train-samples", "48",
                 "--set", "data.max_eval_samples=24", "--set", "training.max_length=192",
                 "--set", "data.doc_stride=48", "--set", "training.eval_batch_size=8",
                 "--set", "pruning.warmup_steps=1",
                 "--set", "pruning.cooldown_steps=1", "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["remaining"] == pytest.approx(0.10, abs=1e-4)
    assert metrics["train_examples"] == 48 and metrics["eval_examples"] == 24
    assert 0 <= metrics["eval"]["exact_match"] <= metrics["eval"]["f1"] <= 100

    # the exported model, loaded with the stock class, gives the job's scores
    examples = load_raw(str(SQUAD), None, ["validation[8981:]"])["validation[8981:]"]
    examples = examples.select(range(24))
    tok = AutoTokenizer.from_pretrained(out / "model")
    feats = qa.tokenize(examples, tok, question_column="question", context_column="context",
                        answers_column="answers", max_length=192, doc_stride=48,
                        keep_offsets=True)
    assert len(feats) > len(examples)  # some contexts span several windows
    batch = tok.pad({k: feats[k] for k in ("input_ids", "token_type_ids", "attention_mask")},
                    return_tensors="pt")
    model = AutoModelForQuestionAnswering.from_pretrained(out / "model").eval()
    with torch.no_grad():
        logits = model(**batch)
    scores = qa.Reference.build(feats, examples, "context", "answers").score(
        logits.start_logits, logits.end_logits)
    assert scores == pytest.approx({k: metrics["eval"][k] for k in ("exact_match", "f1")})
