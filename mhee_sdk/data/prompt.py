"""Turns a request and its retrieved interactions into a short prompt within a token budget.

The wording comes from a :class:`PromptTemplate`: a dataset supplies its own (``TemplatedDataset``),
others get the generic default, and a run config's ``prompt`` table overrides single fields.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mhee_sdk.types import Request, Retrieved

if TYPE_CHECKING:  # pandas stays unimported until a table is read (config validation imports this module)
    import pandas as pd

# the placeholders each sentence of a template may use
_SENTENCE_FIELDS = ("noun", "yes", "no")
_PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "system": _SENTENCE_FIELDS,
    "question": _SENTENCE_FIELDS,
    "profile": ("user",),
    "history_heading": _SENTENCE_FIELDS,
    "history_line": ("item", "rating"),
    "candidate_heading": _SENTENCE_FIELDS,
    "candidate_line": ("user", "rating"),
    "similar_heading": _SENTENCE_FIELDS,
    "similar_line": ("user", "item", "rating"),
    "candidate": ("item",),
}


@dataclass(frozen=True)
class PromptTemplate:
    """The wording of a task's prompts. Every field has a default that reads well for any domain.

    A prompt is: `profile` (left out when `user` is empty), up to three evidence sections (a heading,
    then one line per retrieved interaction: the user's own history, similar users on the candidate,
    similar users on other items), then `candidate` and `question`. `system` is the chat system message.

    Args:
        noun: the domain noun ("movie", "book", "product"); sentences may use ``{noun}``.
        item: ``str.format`` templates over the items table's columns (plus ``{id}``, the original id),
            e.g. ``"{title} ({year}; {genres})"``. The first whose placeholders all have a value is used
            (the last one anyway); an item without one is ``"{noun} #{id}"``.
        user: the same over the users table's columns, e.g. ``"{age}-year-old {gender} {occupation}"``;
            empty: no profile line, and other users are `unknown_user`.
        values: words for coded values, by column: ``{"gender": {"M": "male", "F": "female"}}``.
        unknown_user: how a user without a profile is written.
        yes, no: the answer words (the question asks for them; the verbalizer head reads their logits).
        rating_words: words for rating values in evidence lines, e.g. ``{"1": "liked", "0": "not liked"}``
            (keys as ``f"{rating:g}"`` writes them); other values are written as numbers.
        profile, history_heading, history_line, candidate_heading, candidate_line, similar_heading,
            similar_line, candidate: the sentences; lines use ``{user}``, ``{item}``, ``{rating}``.
    """

    noun: str = "item"
    item: tuple[str, ...] = ()
    user: tuple[str, ...] = ()
    values: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    unknown_user: str = "a user"
    system: str = "You are a recommender system. Answer with {yes} or {no}."
    question: str = "Will the user like the candidate {noun}? Answer {yes} or {no}."
    yes: str = "Yes"
    no: str = "No"
    rating_words: Mapping[str, str] = field(default_factory=dict)
    profile: str = "User: {user}."
    history_heading: str = "The user's earlier ratings:"
    history_line: str = "- {item}: {rating}"
    candidate_heading: str = "Ratings of the candidate by similar users:"
    candidate_line: str = "- {user}: {rating}"
    similar_heading: str = "Ratings by similar users:"
    similar_line: str = "- {user} rated {item}: {rating}"
    candidate: str = "Candidate: {item}"

    def __post_init__(self) -> None:
        for name in ("item", "user"):  # one template or a list of them (TOML arrays arrive as lists)
            value = getattr(self, name)
            value = (value,) if isinstance(value, str) else value
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"prompt.{name} must be a template string or a list of them, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in ("noun", "unknown_user", "yes", "no", *_PLACEHOLDERS):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"prompt.{name} must be a string, got {getattr(self, name)!r}")
        for name, allowed in _PLACEHOLDERS.items():
            _check_placeholders(f"prompt.{name}", getattr(self, name), allowed)
        if not isinstance(self.values, Mapping) or not all(isinstance(v, Mapping) for v in self.values.values()):
            raise ValueError(f"prompt.values must map a column to {{value: word}}, got {self.values!r}")
        values = {str(column): {_key(k): str(w) for k, w in words.items()} for column, words in self.values.items()}
        object.__setattr__(self, "values", values)
        if not isinstance(self.rating_words, Mapping):
            raise ValueError(f"prompt.rating_words must map a rating to a word, got {self.rating_words!r}")
        object.__setattr__(self, "rating_words", {_key(k): str(w) for k, w in self.rating_words.items()})

    def with_overrides(self, overrides: Mapping[str, Any]) -> PromptTemplate:
        """A copy with some fields replaced (a run config's ``prompt`` table); unknown keys are an error."""
        known = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(f"prompt keys {unknown} are unknown; known keys: {', '.join(known)}")
        return dataclasses.replace(self, **overrides)

    def sentence(self, name: str) -> str:
        """One of the fixed sentences with ``{noun}``, ``{yes}`` and ``{no}`` filled in."""
        return getattr(self, name).format(noun=self.noun, yes=self.yes, no=self.no)

    def rating_text(self, rating: float) -> str:
        """A rating as evidence lines write it: its word, else the number (``4``, ``3.5``)."""
        number = f"{rating:g}"
        return self.rating_words.get(number, number)


def _key(value: object) -> str:
    """Mapping keys as text: numbers the way ``:g`` writes them (so 1, 1.0 and "1" agree)."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int | float):
        return f"{value:g}"
    return str(value)


def _check_placeholders(where: str, template: str, allowed: Sequence[str]) -> None:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"{where} {template!r} is not a valid template ({err}); write a brace as {{{{") from err
    bad = [name for name in names if name not in allowed]
    if bad:
        choices = ", ".join(f"{{{a}}}" for a in allowed) or "none"
        raise ValueError(f"{where} {template!r} uses {{{bad[0]}}}; it may use: {choices}")


def approx_tokens(text: str) -> int:
    """A tokenizer-free estimate (about 3.5 characters per token for English BPE vocabularies)."""
    return math.ceil(len(text) / 3.5)


class _Describer:
    """Writes one row of a users or items table through a list of templates (see PromptTemplate.item)."""

    def __init__(
        self, what: str, table: pd.DataFrame, key: str, templates: Sequence[str], values: Mapping[str, Mapping]
    ) -> None:
        self.templates = [(t, [n for _, n, _, _ in string.Formatter().parse(t) if n]) for t in templates]
        columns = [c for c in table.columns if c != key]
        for template, names in self.templates:
            missing = [n for n in names if n != "id" and n not in columns]
            if missing:
                raise ValueError(
                    f"prompt.{what} {template!r} names column {missing[0]!r}; the {what}s table has: "
                    f"{', '.join(['id', *columns])}"
                )
        self.values = values
        self.columns = columns

    def describe(self, row: Mapping[str, Any]) -> str:
        fields = {name: self._text(name, row.get(name)) for name in self.columns}
        fields["id"] = self._text("id", row.get("id"))
        for n, (template, names) in enumerate(self.templates):
            if n == len(self.templates) - 1 or all(fields[name] for name in names):
                return template.format(**fields).strip()
        return ""

    def _text(self, column: str, value: object) -> str:
        from pandas import isna

        if isna(value):  # None, NaN, NaT, pd.NA: an empty field
            return ""
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        text = str(value)
        return self.values.get(column, {}).get(text, text)


@dataclass
class PromptBuilder:
    """Writes prompts like (MovieLens' template)::

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
    backbone puts before every prompt. Tables: ``users`` keyed by ``user``, ``items`` by ``item``
    (the ints of requests); an optional ``user_id`` / ``item_id`` column holds the original ids.
    """

    users: pd.DataFrame
    items: pd.DataFrame
    max_tokens: int = 256
    count_tokens: Callable[[str], int] = approx_tokens
    template: PromptTemplate = field(default_factory=PromptTemplate)
    _user_text: dict[int, str] = field(init=False, repr=False)
    _item_text: dict[int, str] = field(init=False, repr=False)
    _item_id: dict[int, object] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_tokens < 16:
            raise ValueError(f"max_tokens={self.max_tokens!r} is too small; a prompt needs at least 16")
        t = self.template
        self._user_text = self._describe("user", self.users, t.user) if t.user else {}
        self._item_text = self._describe("item", self.items, t.item) if t.item else {}
        ids = self.items.get("item_id", self.items.get("item"))
        self._item_id = {} if ids is None else dict(zip(self.items["item"].astype(int), ids, strict=True))

    def _describe(self, what: str, table: pd.DataFrame, templates: Sequence[str]) -> dict[int, str]:
        if what not in table.columns:  # e.g. an empty table: nobody has a profile
            return {}
        key_id = f"{what}_id"
        describer = _Describer(what, table.drop(columns=[key_id], errors="ignore"), what, templates,
                               self.template.values)  # fmt: skip
        rows = table.to_dict("records")
        return {int(row[what]): describer.describe({**row, "id": row.get(key_id, row[what])}) for row in rows}

    @property
    def system_prompt(self) -> str | None:
        """The chat system message (None when the template's `system` is empty)."""
        return self.template.sentence("system") or None

    def user_text(self, user: int) -> str:
        """Profile phrase of a user, e.g. ``24-year-old male technician``."""
        return self._user_text.get(int(user)) or self.template.unknown_user

    def item_text(self, item: int) -> str:
        """How the template describes an item, e.g. ``Toy Story (1995; Animation, Children's, Comedy)``."""
        return self._item_text.get(int(item)) or f"{self.template.noun} #{self._item_id.get(int(item), item)}"

    def build(self, request: Request, retrieved: Sequence[Retrieved] = ()) -> str:
        """The prompt for one request; evidence that does not fit the budget is left out."""
        t = self.template
        head = [t.profile.format(user=self.user_text(request.user))] if t.user else []
        tail = f"{t.candidate.format(item=self.item_text(request.item))}\n{t.sentence('question')}"
        own = [r for r in retrieved if r.user == request.user]
        others = [r for r in retrieved if r.user != request.user]
        sections = [
            (
                t.sentence("history_heading"),
                [t.history_line.format(item=self.item_text(r.item), rating=t.rating_text(r.rating)) for r in own],
            ),
            (
                t.sentence("candidate_heading"),
                [
                    t.candidate_line.format(user=self.user_text(r.user), rating=t.rating_text(r.rating))
                    for r in others
                    if r.item == request.item
                ],
            ),
            (
                t.sentence("similar_heading"),
                [
                    t.similar_line.format(
                        user=self.user_text(r.user), item=self.item_text(r.item), rating=t.rating_text(r.rating)
                    )
                    for r in others
                    if r.item != request.item
                ],
            ),
        ]
        budget = self.max_tokens - self.count_tokens("\n".join([*head, tail])) - 1
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
        return "\n".join([*head, *body, tail])

    def build_many(self, requests: Sequence[Request], retrieved: Sequence[Sequence[Retrieved]]) -> list[str]:
        """Prompts for a batch; `retrieved[i]` belongs to `requests[i]`."""
        if len(requests) != len(retrieved):
            raise ValueError(f"{len(requests)} requests but {len(retrieved)} retrieved lists")
        return [self.build(r, ev) for r, ev in zip(requests, retrieved, strict=True)]
