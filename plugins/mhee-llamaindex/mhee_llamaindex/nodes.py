"""Interactions as LlamaIndex nodes and back: ``TextNode`` per (user, item, rating, ts), hits to `Retrieved`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
from llama_index.core.schema import BaseNode, TextNode

from mhee_sdk.data.log import Events
from mhee_sdk.data.movielens import MOVIE_TEMPLATE, MovieLens100K
from mhee_sdk.data.prompt import PromptBuilder
from mhee_sdk.types import Request, Retrieved

METADATA_KEYS = ("item", "user", "rating", "ts")
ITEM_COLUMNS = ("item", "title", "year", "genres")


class MissingMetadataError(KeyError):
    """A retrieved node lacks a metadata key the retriever was told to read."""

    def __str__(self) -> str:
        return str(self.args[0])


def load_items(items: pd.DataFrame | None = None) -> pd.DataFrame:
    """`items` (columns item, title, year, genres) checked, or MovieLens-100K's when None."""
    if items is None:
        return MovieLens100K().load().items
    missing = [column for column in ITEM_COLUMNS if column not in items.columns]
    if missing:
        raise ValueError(f"items lacks column(s) {', '.join(missing)}; it needs {', '.join(ITEM_COLUMNS)}")
    return items


def item_texts(items: pd.DataFrame) -> Callable[[int], str]:
    """``item -> "Toy Story (1995; Animation, Children's, Comedy)"``, exactly as the prompt writes it."""
    return PromptBuilder(users=pd.DataFrame(), items=items, template=MOVIE_TEMPLATE).item_text


def interaction_node(
    user: int, item: int, rating: float, ts: int, item_text: str, embedding: list[float] | None = None
) -> TextNode:
    """One interaction as a node: ``"<item text>, rated 4"`` with metadata item, user, rating, ts."""
    return TextNode(
        id_=f"u{user}-i{item}-t{ts}",  # stable ids keep tie order the same from run to run
        text=f"{item_text}, rated {float(rating):g}",
        metadata={"item": int(item), "user": int(user), "rating": float(rating), "ts": int(ts)},
        # the metadata is for filters and for mapping hits back, not for BM25 terms or embeddings
        excluded_embed_metadata_keys=list(METADATA_KEYS),
        excluded_llm_metadata_keys=list(METADATA_KEYS),
        embedding=embedding,
    )


def interaction_nodes(events: Events, item_text: Callable[[int], str]) -> list[TextNode]:
    """Nodes for parallel event arrays, e.g. ``log.before(user, ts)``."""
    return [
        interaction_node(int(u), int(i), float(r), int(t), item_text(int(i)))
        for u, i, r, t in zip(events.user, events.item, events.rating, events.ts, strict=True)
    ]


def metadata_value(node: BaseNode, key: str, cast: Callable[[Any], Any], hint: str = "") -> Any:
    """``cast(node.metadata[key])``, or an error that names the key and the node."""
    if key not in node.metadata:
        present = ", ".join(map(repr, node.metadata)) or "none"
        message = f"node {node.node_id!r} has no metadata key {key!r} (it has: {present})"
        raise MissingMetadataError(f"{message}; {hint}" if hint else message)
    value = node.metadata[key]
    try:
        return cast(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"node {node.node_id!r}: metadata {key!r}={value!r} is not a {cast.__name__}") from err


def best_first(request: Request, found: Sequence[Retrieved], k: int, same_user: bool = True) -> list[Retrieved]:
    """The time rule as a last guard: keep hits strictly before the request (and of its user), top k."""
    kept = [r for r in found if r.ts < request.ts and (r.user == request.user or not same_user)]
    return sorted(kept, key=lambda r: (-r.score, -r.ts, r.item))[:k]
