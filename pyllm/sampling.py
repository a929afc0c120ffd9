"""Choosing the next token from logits, in transformers' order: repetition penalty, then
temperature, top-k, top-p and min-p. Temperature 0 is greedy (after the repetition penalty)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off: drop tokens less likely than min_p x the most likely one
    repetition_penalty: float = 1.0  # 1 = off: as transformers, for every token already in the context
    seed: int | None = None

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if not self.repetition_penalty > 0:
            raise ValueError("repetition_penalty must be > 0")


class Sampler:
    def __init__(self, params: SamplingParams):
        params.validate()
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, context: list[int] | None = None) -> int:
        """logits: f32 [vocab]; context: the token ids so far (for the repetition penalty) -> token id."""
        if self.params.temperature == 0:
            return int(np.argmax(self.penalized(logits, context)))
        probs = self.probabilities(logits, context)
        return int(self.rng.choice(probs.size, p=probs))

    def penalized(self, logits: np.ndarray, context: list[int] | None = None) -> np.ndarray:
        """logits: f32 [vocab] -> f64 [vocab] after the repetition penalty (transformers' rule)."""
        p = self.params
        scores = logits.astype(np.float64)
        if p.repetition_penalty != 1.0 and context:
            seen = np.unique(np.asarray(context, dtype=np.int64))
            picked = scores[seen]
            scores[seen] = np.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
        return scores

    def probabilities(self, logits: np.ndarray, context: list[int] | None = None) -> np.ndarray:
        """The distribution a token is drawn from, f64 [vocab] summing to 1 (temperature > 0)."""
        p = self.params
        scores = self.penalized(logits, context) / p.temperature
        if p.top_k and p.top_k < scores.size:
            kth = np.partition(scores, -p.top_k)[-p.top_k]
            scores = np.where(scores >= kth, scores, -np.inf)
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, p.top_p)) + 1]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        if p.min_p > 0.0:
            probs = np.where(probs >= p.min_p * probs.max(), probs, 0.0)
            probs /= probs.sum()
        return probs
