"""Tiny models built from configs, shared by the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

#: The project's example job files and their shipped data.
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def tiny_bert(num_labels: int = 2, seed: int = 0, vocab_size: int = 100) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(config)


class MLP(nn.Module):
    """A torch-only model: two hidden Linears and a head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def bert_batch(seed: int = 0, batch: int = 8, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 100, (batch, length), generator=g),
            "labels": torch.randint(0, 2, (batch,), generator=g)}


def mlp_batch(seed: int = 0, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 12, generator=g), torch.randint(0, 3, (batch,), generator=g)


WORDS = ["good", "great", "fun", "bad", "awful", "dull", "movie", "plot", "the", "a", "was",
         "is", "very", "not"]


def tiny_hf_folder(path, num_labels: int = 2, seed: int = 0, vocab_extra: int = 0):
    """A tiny BERT classifier + WordPiece tokenizer saved like a Hub model (offline)."""
    from pathlib import Path

    from transformers import BertTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS,
             *[f"extra{i}" for i in range(vocab_extra)]]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    tiny_bert(num_labels, seed, vocab_size=len(vocab)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_glue_folder(path, n_train: int = 96, n_eval: int = 32, regression: bool = False):
    """A dataset folder in the Hub's parquet layout: <config>/<split>-00000-of-00001.parquet."""
    import random
    from pathlib import Path

    import datasets

    rng = random.Random(0)
    path = Path(path)

    def rows(n):
        out = {"sentence": [], "label": [], "idx": []}
        for i in range(n):
            positive = rng.random() < 0.5
            words = rng.sample(WORDS[:3] if positive else WORDS[3:6], 2) + ["movie"]
            out["sentence"].append(" ".join(words))
            out["label"].append(float(positive) * 5.0 if regression else int(positive))
            out["idx"].append(i)
        return out

    features = datasets.Features({
        "sentence": datasets.Value("string"),
        "label": datasets.Value("float32") if regression else datasets.ClassLabel(names=["negative", "positive"]),
        "idx": datasets.Value("int32")})
    (path / "toy").mkdir(parents=True, exist_ok=True)
    (path / "README.md").write_text(  # the Hub's layout: configs named in the card's header
        "---\nconfigs:\n- config_name: toy\n  data_files:\n  - split: train\n"
        "    path: toy/train-00000-of-00001.parquet\n  - split: validation\n"
        "    path: toy/validation-00000-of-00001.parquet\n---\n")
    for split, n in (("train", n_train), ("validation", n_eval)):
        datasets.Dataset.from_dict(rows(n), features=features).to_parquet(
            str(path / "toy" / f"{split}-00000-of-00001.parquet"))
    return path


def tiny_squad_file(path, n_articles: int = 4, questions: int = 12, seed: int = 0):
    """A SQuAD v1.1-format JSON file of word salad: each answer is a run of words of its
    context, some contexts longer than a short window."""
    import json
    import random
    from pathlib import Path

    rng = random.Random(seed)
    data = []
    for a in range(n_articles):
        paragraphs = []
        for p in range(2):
            words = [rng.choice(WORDS) for _ in range(rng.randint(6, 40))]
            context = " ".join(words)
            qas = []
            for q in range(questions // 2):
                first = rng.randrange(len(words))
                answer = words[first:first + rng.randint(1, 3)]
                start = len(" ".join(words[:first])) + (1 if first else 0)
                gold = [{"text": " ".join(answer), "answer_start": start}]
                qas.append({"id": f"{a}-{p}-{q}", "question": f" what {answer[0]} ?",
                            "answers": gold * rng.randint(1, 3)})
            paragraphs.append({"context": context, "qas": qas})
        data.append({"title": f"article {a}", "paragraphs": paragraphs})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": "1.1", "data": data}))
    return path


def tiny_qa_folder(path, seed: int = 0):
    """A tiny BERT for extractive question answering, saved like a Hub model (offline)."""
    from transformers import BertForQuestionAnswering

    path = tiny_hf_folder(path, seed=seed)
    config = BertForQuestionAnswering.config_class.from_pretrained(path)
    torch.manual_seed(seed)
    BertForQuestionAnswering(config).save_pretrained(path)
    return path


def job_assets(root):
    """Tiny models and datasets for fine-pruning jobs, saved like the Hub's (offline)."""
    from pathlib import Path

    root = Path(root)
    return {"model": str(tiny_hf_folder(root / "model")),
            "data": str(tiny_glue_folder(root / "glue")),
            "regression": str(tiny_glue_folder(root / "glue-reg", regression=True)),
            "other_vocab": str(tiny_hf_folder(root / "other", vocab_extra=3)),
            "root": root}


def job_dict(assets, out, **pruning):
    """A 6-step movement-pruning job on the tiny assets, writing to ``out``."""
    return {"model": assets["model"],
            "data": {"path": assets["data"], "name": "toy", "text_columns": ["sentence"]},
            "training": {"max_steps": 6, "batch_size": 16, "learning_rate": 1e-3,
                         "logging_steps": 2, "max_length": 16},
            "pruning": {"method": "movement", "final_remaining": 0.2, "warmup_steps": 1,
                        "cooldown_steps": 2, **pruning},
            "output_dir": str(out)}
