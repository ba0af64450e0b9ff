"""Turns a request and its retrieved interactions into a short prompt within a token budget."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd

from mhee_sdk.types import Request, Retrieved

TEMPLATE_VERSION = "v1"  # bump when the wording changes: cached hidden states are keyed on it

QUESTION = "Will the user like the candidate movie (rate it 4 or 5)? Answer Yes or No."
SYSTEM_PROMPT = "You are a movie recommender. Answer with Yes or No."


def approx_tokens(text: str) -> int:
    """A tokenizer-free estimate (about 3.5 characters per token for English BPE vocabularies)."""
    return math.ceil(len(text) / 3.5)


@dataclass
class PromptBuilder:
    """Writes prompts like:

        User: 24-year-old male technician.
        The user's earlier ratings (1-5):
        - Toy Story (1995; Animation, Children's, Comedy): 5
        Ratings of the candidate by similar users:
        - 31-year-old female writer: 4
        Candidate: GoldenEye (1995; Action, Adventure, Thriller)
        Will the user like the candidate movie (rate it 4 or 5)? Answer Yes or No.

    Retrieved interactions are added best first while the prompt stays within `max_tokens`
    (counted by `count_tokens`: pass the backbone's counter for exact budgets; the backbone's chat
    template adds a fixed number of tokens on top). `system_prompt` is the chat system message the
    backbone puts before every prompt.
    """

    users: pd.DataFrame
    items: pd.DataFrame
    max_tokens: int = 256
    count_tokens: Callable[[str], int] = approx_tokens
    system_prompt: str | None = SYSTEM_PROMPT
    _user_text: dict[int, str] = field(init=False, repr=False)
    _item_text: dict[int, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_tokens < 16:
            raise ValueError(f"max_tokens={self.max_tokens!r} is too small; a prompt needs at least 16")
        self._user_text = {
            int(row.user): f"{row.age}-year-old {'male' if row.gender == 'M' else 'female'} {row.occupation}"
            for row in self.users.itertuples()
        }
        self._item_text = {
            int(row.item): f"{row.title} ({row.year}; {row.genres})" if row.year else f"{row.title} ({row.genres})"
            for row in self.items.itertuples()
        }

    def user_text(self, user: int) -> str:
        """Profile phrase of a user, e.g. ``24-year-old male technician``."""
        return self._user_text.get(int(user), "user of unknown profile")

    def item_text(self, item: int) -> str:
        """Title, year and genres of an item."""
        return self._item_text.get(int(item), f"movie #{item}")

    def build(self, request: Request, retrieved: Sequence[Retrieved] = ()) -> str:
        """The prompt for one request; evidence that does not fit the budget is left out."""
        head = f"User: {self.user_text(request.user)}."
        tail = f"Candidate: {self.item_text(request.item)}\n{QUESTION}"
        own = [r for r in retrieved if r.user == request.user]
        others = [r for r in retrieved if r.user != request.user]
        sections = [
            ("The user's earlier ratings (1-5):", [f"- {self.item_text(r.item)}: {r.rating:g}" for r in own]),
            (
                "Ratings of the candidate by similar users:",
                [f"- {self.user_text(r.user)}: {r.rating:g}" for r in others if r.item == request.item],
            ),
            (
                "Ratings by similar users:",
                [
                    f"- {self.user_text(r.user)} rated {self.item_text(r.item)}: {r.rating:g}"
                    for r in others
                    if r.item != request.item
                ],
            ),
        ]
        budget = self.max_tokens - self.count_tokens(f"{head}\n{tail}") - 1
        if budget < 0:
            raise ValueError(
                f"max_tokens={self.max_tokens} cannot hold even the profile and candidate of request "
                f"{request.request_id}; raise it"
            )
        body: list[str] = []
        for title, lines in sections:
            kept: list[str] = []
            for line in lines:
                # +1 per line for the newline joining it
                cost = self.count_tokens(line) + 1 + (0 if kept else self.count_tokens(title) + 1)
                if cost > budget:
                    break
                budget -= cost
                kept.append(line)
            if kept:
                body += [title, *kept]
        return "\n".join([head, *body, tail])

    def build_many(self, requests: Sequence[Request], retrieved: Sequence[Sequence[Retrieved]]) -> list[str]:
        """Prompts for a batch; `retrieved[i]` belongs to `requests[i]`."""
        if len(requests) != len(retrieved):
            raise ValueError(f"{len(requests)} requests but {len(retrieved)} retrieved lists")
        return [self.build(r, ev) for r, ev in zip(requests, retrieved, strict=True)]
