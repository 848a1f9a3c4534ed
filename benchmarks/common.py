"""Shared pieces of the benchmarks: models, batches, timing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


def build_model(name: str) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    from prune_plugin.integrations.job import resolve_model

    torch.manual_seed(0)
    if name == "minilm":
        return BertForSequenceClassification.from_pretrained(resolve_model("minilm"),
                                                             num_labels=2)
    if name == "bert-base":
        return BertForSequenceClassification(BertConfig(num_labels=2))
    raise ValueError(f"unknown model {name!r}; use 'minilm' or 'bert-base'")


BATCH = {"minilm": 16, "bert-base": 8}


def batch_for(name: str, seq: int = 128, seed: int = 0, batch: int | None = None
              ) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = batch or BATCH[name]
    return {"input_ids": torch.randint(1000, 30000, (b, seq), generator=g),
            "attention_mask": torch.ones(b, seq, dtype=torch.long),
            "labels": torch.randint(0, 2, (b,), generator=g)}


def encoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".encoder." in f".{n}."]


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
