"""Extractive question answering (SQuAD): features, answer decoding, the SQuAD metrics.

A question and its context become one or more features of at most ``max_length`` tokens: a
long context is cut into windows that overlap by ``doc_stride`` tokens (BERT's SQuAD recipe,
which the paper's SQuAD runs use). A training feature carries the answer's first and last
token, or the [CLS] position when its window does not hold the answer. Evaluation takes, for
each question, the best-scoring span over all its windows and scores it with the official
SQuAD v1.1 exact match and F1.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

#: Longest answer considered when decoding, in tokens (as in BERT's and the paper's code).
MAX_ANSWER_TOKENS = 30
PUNCTUATION = frozenset(string.punctuation)
#: Marks a token outside the context (question, special or padding) in the offsets column.
OUTSIDE = [-1, -1]


def tokenize(examples: Any, tokenizer: Any, *, question_column: str, context_column: str,
             answers_column: str, max_length: int, doc_stride: int, keep_offsets: bool) -> Any:
    """Tokenise a ``datasets.Dataset`` of questions into features (see the module doc).

    Each feature gets ``start_positions``/``end_positions``; with ``keep_offsets`` also the
    index of its example and the character span of each context token (``OUTSIDE`` for the
    others, padded to ``max_length``), which :class:`Reference` needs. The model never sees
    those two columns: the Trainer drops columns its forward does not take.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("question answering needs a fast tokenizer (it maps tokens back to "
                         "characters). Fix: use a model folder with a tokenizer.json.")

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        # Some SQuAD questions start with whitespace, which would only waste the window.
        questions = [q.lstrip() for q in batch[question_column]]
        longest = max(map(len, tokenizer(questions, add_special_tokens=False)["input_ids"]))
        room = max_length - longest - tokenizer.num_special_tokens_to_add(pair=True)
        if room <= doc_stride:  # the tokenizer would fail (or panic) on it
            raise ValueError(f"a {longest}-token question leaves {max(room, 0)} of max_length "
                             f"({max_length} tokens) for context windows overlapping by "
                             f"doc_stride ({doc_stride}). Fix: raise training.max_length or "
                             "lower data.doc_stride.")
        enc = tokenizer(questions, batch[context_column], truncation="only_second",
                        max_length=max_length, stride=doc_stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True)
        origin = enc.pop("overflow_to_sample_mapping")
        offsets = enc.pop("offset_mapping")
        starts, ends, example_index, context_offsets = [], [], [], []
        for i, example in enumerate(origin):
            span = [tuple(o) if s == 1 else None
                    for o, s in zip(offsets[i], enc.sequence_ids(i))]
            answer = batch[answers_column][example]
            first = answer["answer_start"][0] if answer["answer_start"] else -1
            last = first + len(answer["text"][0]) if first >= 0 else -1
            start, end = _answer_tokens(span, first, last)
            starts.append(start)
            ends.append(end)
            if keep_offsets:
                example_index.append(indices[example])
                context_offsets.append([list(o) if o is not None else OUTSIDE for o in span]
                                       + [OUTSIDE] * (max_length - len(span)))
        enc["start_positions"], enc["end_positions"] = starts, ends
        if keep_offsets:
            enc["example_index"], enc["context_offsets"] = example_index, context_offsets
        return dict(enc)

    return examples.map(encode, batched=True, with_indices=True,
                        remove_columns=examples.column_names, desc="tokenising questions")


def _answer_tokens(span: list[tuple[int, int] | None], first_char: int, end_char: int
                   ) -> tuple[int, int]:
    """The first and last context token covering characters [first_char, end_char), or
    (0, 0), [CLS], when the window does not hold the whole answer."""
    inside = [i for i, o in enumerate(span) if o is not None]
    if first_char < 0 or not inside or span[inside[0]][0] > first_char \
            or span[inside[-1]][1] < end_char:
        return 0, 0
    start = next(i for i in inside if span[i][1] > first_char)
    end = next(i for i in reversed(inside) if span[i][0] < end_char)
    return start, end


def best_spans(start_logits: torch.Tensor, end_logits: torch.Tensor, allowed: torch.Tensor,
               max_answer_tokens: int = MAX_ANSWER_TOKENS, chunk: int = 512
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each row: the span (i, j), i <= j < i + max_answer_tokens, both ends ``allowed``,
    that maximises start_logits[i] + end_logits[j]. Returns (score, i, j); a row with no
    allowed token scores -inf.

    Exact and vectorised: each start is scored against its ``max_answer_tokens`` candidate
    ends at once, a few features (``chunk``) at a time to bound memory.
    """
    n, length = start_logits.shape
    k = max_answer_tokens
    scores, firsts, lasts = [], [], []
    for lo in range(0, n, chunk):
        s = start_logits[lo:lo + chunk].float()
        e = end_logits[lo:lo + chunk].float()
        ok = allowed[lo:lo + chunk]
        # windows[r, i, d] = the end logit at i + d (padded past the end with disallowed)
        e_win = torch.nn.functional.pad(e, (0, k)).unfold(1, k, 1)[:, :length]
        ok_win = torch.nn.functional.pad(ok, (0, k)).unfold(1, k, 1)[:, :length]
        total = (s.unsqueeze(-1) + e_win).masked_fill(~(ok.unsqueeze(-1) & ok_win),
                                                      float("-inf"))
        best, flat = total.flatten(1).max(dim=1)
        first = flat // k
        scores.append(best)
        firsts.append(first)
        lasts.append(first + flat % k)
    return torch.cat(scores), torch.cat(firsts), torch.cat(lasts)


def decode(start_logits: Any, end_logits: Any, offsets: torch.Tensor,
           example_index: list[int], contexts: list[str],
           max_answer_tokens: int = MAX_ANSWER_TOKENS) -> list[str]:
    """The answer text of each example: its best span over all its features.

    Row r of the logits is feature r, whose context tokens have the character spans
    ``offsets[r]`` (OUTSIDE elsewhere) and whose example is ``example_index[r]``. The Trainer
    pads the logits to the longest feature, at most as wide as ``offsets``.
    """
    start_logits, end_logits = torch.as_tensor(start_logits), torch.as_tensor(end_logits)
    offsets = offsets[:, :start_logits.shape[1]]
    score, first, last = best_spans(start_logits, end_logits, offsets[..., 0] >= 0,
                                    max_answer_tokens)
    best: dict[int, tuple[float, int]] = {}
    for row, (example, value) in enumerate(zip(example_index, score.tolist())):
        if value > best.get(example, (float("-inf"), -1))[0]:
            best[example] = (value, row)
    answers = [""] * len(contexts)  # "" when no window held a context token
    for example, (_, row) in best.items():
        i, j = int(first[row]), int(last[row])
        answers[example] = contexts[example][int(offsets[row, i, 0]):int(offsets[row, j, 1])]
    return answers


@dataclass
class Reference:
    """What scoring a set of evaluation features needs: their context offsets and examples,
    and each example's context and gold answers."""

    offsets: torch.Tensor  # (features, max_length, 2), int32
    example_index: list[int]
    contexts: list[str]
    answers: list[list[str]]

    @classmethod
    def build(cls, features: Any, examples: Any, context_column: str, answers_column: str
              ) -> Reference:
        table = features.select_columns(["context_offsets"]).with_format("numpy")
        offsets = torch.from_numpy(table[:]["context_offsets"].astype("int32"))
        return cls(offsets, list(features["example_index"]), list(examples[context_column]),
                   [list(a["text"]) for a in examples[answers_column]])

    def score(self, start_logits: Any, end_logits: Any) -> dict[str, float]:
        answers = decode(start_logits, end_logits, self.offsets, self.example_index,
                         self.contexts)
        return squad_scores(answers, self.answers)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the official SQuAD script)."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _f1(pred: list[str], gold: list[str]) -> float:
    """Token F1 of two normalised answers."""
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], truths: list[list[str]]) -> dict[str, float]:
    """Exact match and token F1 in percent, each the best over a question's gold answers."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} questions")
    em = f1 = 0.0
    for prediction, golds in zip(predictions, truths):
        pred = normalize_answer(prediction)
        normalised = [normalize_answer(g) for g in golds or [""]]
        em += max(float(pred == g) for g in normalised)
        f1 += max(_f1(pred.split(), g.split()) for g in normalised)
    n = max(1, len(predictions))
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}
