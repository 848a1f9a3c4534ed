"""Tiny models built from configs, shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


def tiny_bert(num_labels: int = 2, seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
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
