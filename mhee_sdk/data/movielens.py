"""MovieLens-100K: the generic interaction-log loader on the files `mhee assets install` extracts from recbole.

Split (documented in docs/concepts.md): all 100,000 ratings are ordered by time; the first 80% are
``train``, the next 10% ``valid``, the last 10% ``test``. Boundaries move forward past ties, so every
valid/test rating is strictly later than every train rating. Each rating is one request; its label
is 1 when the rating is >= 4. Evidence for a request comes only from strictly earlier ratings
([`InteractionLog`][mhee_sdk.data.log.InteractionLog]), and retrievers are fitted on ``train`` only.
"""

from __future__ import annotations

from mhee_sdk import assets
from mhee_sdk.data.interactions import InteractionsDataset
from mhee_sdk.data.prompt import PromptTemplate
from mhee_sdk.data.split import temporal_split
from mhee_sdk.hookspecs import hookimpl
from mhee_sdk.interfaces import SPLITS, DatasetTables

SYSTEM_PROMPT = "You are a movie recommender. Answer with Yes or No."
QUESTION = "Will the user like the candidate movie (rate it 4 or 5)? Answer Yes or No."

MOVIE_TEMPLATE = PromptTemplate(
    noun="movie",
    item=("{title} ({year}; {genres})", "{title} ({genres})"),
    user=("{age}-year-old {gender} {occupation}",),
    values={"gender": {"M": "male", "F": "female"}},
    unknown_user="user of unknown profile",
    system=SYSTEM_PROMPT,
    question=QUESTION,
    history_heading="The user's earlier ratings (1-5):",
)
"""MovieLens' prompt wording (unchanged since the first release: cached hidden states stay valid)."""
FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")


class MovieLens100K(InteractionsDataset):
    """943 users, 1682 movies, 100,000 ratings with user age/gender/occupation and movie genres.

    The three tab-separated files through :class:`InteractionsDataset` with a column mapping and
    :data:`MOVIE_TEMPLATE`.

    Args:
        fractions: train/valid/test shares of the time-ordered ratings.
        like_threshold: ratings at or above it are positive (label 1).
    """

    name = "movielens-100k"

    def __init__(self, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), like_threshold: float = 4.0):
        folder = assets.home() / assets.ASSETS[assets.MOVIELENS].folder
        super().__init__(
            path=folder / "ml-100k.inter",
            format="tsv",
            user="user_id:token",
            item="item_id:token",
            timestamp="timestamp:float",
            rating="rating:float",
            like_threshold=like_threshold,
            users_path=folder / "ml-100k.user",
            user_columns={
                "age": "age:token",
                "gender": "gender:token",
                "occupation": "occupation:token",
                "zip": "zip_code:token",
            },
            items_path=folder / "ml-100k.item",
            item_columns={"title": "movie_title:token_seq", "year": "release_year:token", "genres": "class:token_seq"},
            list_columns={"genres": " "},
            fractions=fractions,
            template=MOVIE_TEMPLATE,
        )

    def load(self) -> DatasetTables:
        """Read the three files (cached on the instance); a missing file names `mhee assets install`."""
        for filename in FILES:
            assets.asset_file(assets.MOVIELENS, filename)
        return super().load()


@hookimpl
def register_datasets(register) -> None:
    register("movielens-100k", MovieLens100K)


__all__ = ["MOVIE_TEMPLATE", "SPLITS", "MovieLens100K", "temporal_split"]
