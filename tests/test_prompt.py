from __future__ import annotations

import pytest

from mhee_sdk.data.prompt import PromptBuilder
from mhee_sdk.types import Request, Retrieved


def _builder(movielens, tiny, max_tokens):
    tables = movielens.load()
    return PromptBuilder(
        tables.users, tables.items, max_tokens=max_tokens, count_tokens=tiny.count_tokens,
        template=movielens.prompt_template,
    )  # fmt: skip


def test_prompt_shows_profile_evidence_and_candidate(movielens, tiny):
    builder = _builder(movielens, tiny, 2000)
    request = Request(request_id=0, user=1, item=2, label=1, ts=10**10)
    evidence = [
        Retrieved(user=1, item=1, rating=5, ts=1, score=1.0),
        Retrieved(user=2, item=2, rating=3, ts=2, score=0.9),
    ]
    text = builder.build(request, evidence)
    assert text.startswith("User: 24-year-old male technician.")
    assert "- Toy Story (1995; Animation, Children's, Comedy): 5" in text
    assert "Ratings of the candidate by similar users:\n- 53-year-old female other: 3" in text
    assert "Candidate: GoldenEye (1995; Action, Adventure, Thriller)" in text
    assert text.endswith("Answer Yes or No.")


@pytest.mark.parametrize("budget", [230, 400, 800])  # byte tokens
def test_prompt_respects_token_budget(movielens, tiny, budget):
    builder = _builder(movielens, tiny, budget)
    log = movielens.log
    for request in movielens.requests("test", limit=20):
        history = log.before(request.user, request.ts)
        evidence = [
            Retrieved(user=request.user, item=int(i), rating=float(r), ts=int(t), score=0.0)
            for i, r, t in zip(history.item[::-1], history.rating[::-1], history.ts[::-1], strict=True)
        ][:30]
        text = builder.build(request, evidence)
        assert tiny.count_tokens(text) <= budget
        if budget >= 800 and len(evidence) >= 3:
            assert text.count("\n- ") >= 3  # the budget is used, not ignored


def test_budget_too_small_is_a_clear_error(movielens, tiny):
    builder = _builder(movielens, tiny, 20)
    with pytest.raises(ValueError, match="max_tokens=20 cannot hold"):
        builder.build(Request(0, 1, 2, 1, 10), [])
    with pytest.raises(ValueError, match="too small"):
        _builder(movielens, tiny, 5)
