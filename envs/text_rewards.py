"""Reward functions for text tasks: model-free tasks that need no download, and learned reward models.

Each is a callable R(prompt, response) -> float.
"""
from __future__ import annotations

import re
from typing import Callable

import torch

_INT = re.compile(r"-?\d+")


def increasing_numbers(prompt: str, response: str) -> float:
    """Fraction of strictly increasing adjacent pairs in the number sequence the response continues.

    The prompt's last number starts the sequence ("count: 7" + " 9 12 15" -> pairs 7<9, 9<12, 12<15).
    A response with no number scores 0.
    """
    continuation = [int(x) for x in _INT.findall(response)]
    if not continuation:
        return 0.0
    start = [int(x) for x in _INT.findall(prompt)][-1:]
    numbers = start + continuation
    if len(numbers) < 2:
        return 0.0
    pairs = list(zip(numbers, numbers[1:]))
    return sum(b > a for a, b in pairs) / len(pairs)


def keyword(word: str) -> Callable[[str, str], float]:
    """1 if the response contains `word` (case-insensitive), else 0."""
    return lambda prompt, response: float(word.lower() in response.lower())


def length_window(low: int, high: int, unit: str = "words") -> Callable[[str, str], float]:
    """1 inside [low, high] words (or characters), decaying linearly to 0 at twice the distance."""
    def reward(prompt: str, response: str) -> float:
        n = len(response.split()) if unit == "words" else len(response)
        if low <= n <= high:
            return 1.0
        gap = low - n if n < low else n - high
        return max(0.0, 1.0 - gap / max(low if n < low else high, 1))
    return reward


TEXT_REWARDS = {"increasing_numbers": increasing_numbers}


class SequenceClassifierReward:
    """Any Hugging Face sequence-classification model given by path: R = sigmoid(logit) of the last label."""

    def __init__(self, path: str, device: str = "cpu", template: str = "{prompt}{response}"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        self.template, self.device = template, device

    @torch.no_grad()
    def __call__(self, prompt: str, response: str) -> float:
        inputs = self.tokenizer(self.template.format(prompt=prompt, response=response), return_tensors="pt", truncation=True).to(self.device)
        return float(torch.sigmoid(self.model(**inputs).logits[0, -1]))
