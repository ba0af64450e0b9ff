"""The generic interaction-log dataset: MovieLens as one instance of it, any ids and times, clear errors, slices."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

from mhee_sdk.cli import main
from mhee_sdk.config import RunConfig
from mhee_sdk.data.check import check_log
from mhee_sdk.data.interactions import DataError, DataWarning, InteractionsDataset
from mhee_sdk.data.movielens import MOVIE_TEMPLATE
from mhee_sdk.data.prompt import PromptBuilder
from mhee_sdk.data.split import RequestSlices, describe_slices
from mhee_sdk.data.synthetic import synthetic_clicks
from mhee_sdk.evaluation import Experiment
from mhee_sdk.registry import Registry
from mhee_sdk.store import Store
from mhee_sdk.types import Retrieved

CLICKS = dict(user="visitor", item="sku", timestamp="time", label="clicked", item_columns=["title", "category"])
TINY = dict(backbone="tiny", retriever="recent", k=4, prompt_tokens=400, head="linear", exit_layers=[2, 4, 6],
            train_requests=60, valid_requests=40, eval_requests=40, batch_size=20)  # fmt: skip


# ---------------------------------------------------------------- MovieLens is exactly what it was
def _sha(*arrays) -> str:
    h = hashlib.sha256()
    for a in map(np.asarray, arrays):
        h.update("|".join(map(str, a)).encode() if a.dtype == object else np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _evidence(events) -> list[Retrieved]:
    return [Retrieved(int(u), int(i), float(x), int(t), 0.0) for u, i, x, t in zip(*events, strict=True)]


def _digests(dataset, template) -> tuple[dict[str, str], list[str]]:
    """Digests of the interactions, every split's requests, histories and prompts of 400 sampled requests.

    The expected values below were computed with the MovieLens loader and PromptBuilder before they became
    the generic loader and template (commit 0a98135), so any change in requests, splits, evidence or wording
    shows here.
    """
    tables = dataset.load()
    inter = tables.interactions
    out = {
        "interactions": _sha(inter["user"].to_numpy(np.int64), inter["item"].to_numpy(np.int64),
                             inter["rating"].to_numpy(np.float64), inter["ts"].to_numpy(np.int64),
                             inter["label"].to_numpy(np.int64), inter["split"].to_numpy(object),
                             inter.index.to_numpy(np.int64)),
        "requests": _sha(*[np.array([(r.request_id, r.user, r.item, r.label, r.ts) for r in dataset.requests(s)])
                           for s in ("train", "valid", "test")]),
    }  # fmt: skip
    sample = dataset.requests("test", limit=300, seed=7) + dataset.requests("valid", limit=100, seed=3)
    out["sample"] = _sha(np.array([(r.request_id, r.user, r.item, r.label, r.ts) for r in sample]))
    log, history = dataset.log, []
    for r in sample:
        history += [*log.before(r.user, r.ts), *log.raters(r.item, r.ts)]
    out["histories"] = _sha(*history)
    texts = []
    for budget in (160, 2000):
        builder = PromptBuilder(tables.users, tables.items, max_tokens=budget, template=template)
        prompts = []
        for r in sample:  # the user's history, raters of the candidate, another user's items, an unknown user/item
            own, raters = log.before(r.user, r.ts).last(6), log.raters(r.item, r.ts).last(4)
            other = log.before((r.user % 900) + 1, r.ts).last(3)
            evidence = _evidence(own)[::-1] + _evidence(raters) + [e for e in _evidence(other) if e.user != r.user]
            evidence.append(Retrieved(99999, 99999, 3.0, 1, 0.0))
            prompts.append(builder.build(r, evidence))
        out[f"prompts_{budget}"] = _sha(np.array(prompts, dtype=object))
        texts += prompts
    out["system"] = builder.system_prompt
    return out, texts


BEFORE = {
    "interactions": "d5bff43155f17886", "requests": "0b9ca308b5ac7d5c", "sample": "dee3d83044a01ada",
    "histories": "7a3aa0557c294317", "prompts_160": "51a726b9ddd065e9", "prompts_2000": "24841289a3f67cfb",
    "system": "You are a movie recommender. Answer with Yes or No.",
}  # fmt: skip
FIRST_PROMPT = """User: 60-year-old male educator.
The user's earlier ratings (1-5):
- Tango Lesson, The (1997; Romance): 3
- Kiss Me, Guido (1997; Comedy): 4
- Murder at 1600 (1997; Mystery, Thriller): 4
- As Good As It Gets (1997; Comedy, Drama): 5
- Dante's Peak (1997; Action, Thriller): 3
- She's So Lovely (1997; Drama, Romance): 1
Ratings of the candidate by similar users:
- 42-year-old male other: 3
- 31-year-old male educator: 5
- 57-year-old male administrator: 3
- 52-year-old female other: 5
Ratings by similar users:
- user of unknown profile rated movie #99999: 3
Candidate: All About Eve (1950; Drama)
Will the user like the candidate movie (rate it 4 or 5)? Answer Yes or No."""


@pytest.fixture(scope="module")
def movielens_digests(movielens):
    return _digests(movielens, movielens.prompt_template)


def test_movielens_gives_exactly_the_requests_histories_and_prompts_of_before(movielens, movielens_digests):
    found, texts = movielens_digests
    assert texts[400] == FIRST_PROMPT  # the first sampled request with the large budget
    assert found == BEFORE
    assert isinstance(movielens, InteractionsDataset) and movielens.prompt_template == MOVIE_TEMPLATE


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_movielens_round_trip_through_files_equals_the_builtin(movielens, movielens_digests, tmp_path, fmt):
    tables = movielens.load()
    files = {}
    ratings = tables.interactions[["user", "item", "rating", "ts"]].sample(frac=1, random_state=0)  # any row order
    for name, frame in (("ratings", ratings), ("users", tables.users.drop(columns="user_id")),
                        ("items", tables.items.drop(columns="item_id"))):  # fmt: skip
        files[name] = tmp_path / f"{name}.{fmt}"
        frame.to_csv(files[name], index=False) if fmt == "csv" else frame.to_parquet(files[name], index=False)
    copy = InteractionsDataset(
        files["ratings"], timestamp="ts", rating="rating", like_threshold=4,
        users_path=files["users"], user_columns=["age", "gender", "occupation", "zip"],
        items_path=files["items"], item_columns=["title", "year", "genres"], template=MOVIE_TEMPLATE,
    )  # fmt: skip
    assert _digests(copy, copy.prompt_template)[0] == movielens_digests[0]


# ---------------------------------------------------------------- your own log, end to end
@pytest.fixture(scope="module")
def clicks_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("log") / "clicks.csv"
    synthetic_clicks(users=80, items=60, events=1500, seed=1).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def clicks_run(clicks_csv, tmp_path_factory):
    """A tiny-backbone run on a log with text ids, float timestamps and 0/1 clicks."""
    config = RunConfig(**TINY, dataset="interactions", dataset_params={"path": str(clicks_csv), **CLICKS},
                       prompt={"noun": "product"})  # fmt: skip
    folder = tmp_path_factory.mktemp("run")
    experiment = Experiment(config, registry=Registry(load_entry_points=False), progress=False, cache_dir=folder)
    experiment.fit_heads()
    store = Store.open(folder / "runs.duckdb")
    return experiment, store, experiment.run("never", store=store)


def test_own_log_runs_end_to_end_without_leakage(clicks_run):
    experiment, store, run = clicks_run
    tables = experiment.tables
    assert tables.users["user_id"].str.startswith("v").all() and tables.items["item_id"].str.startswith("sku-").all()
    assert tables.interactions["ts"].is_monotonic_increasing and len(store.predictions(run.run_id)) == 40
    requests = experiment.requests()
    _, retrieved = experiment.prompts(requests)
    assert sum(map(len, retrieved)) > 0
    for request, found in zip(requests, retrieved, strict=True):
        assert all(r.ts < request.ts for r in found)
        assert np.all(experiment.dataset.log.before(request.user, request.ts).ts < request.ts)
        assert np.all(experiment.dataset.log.raters(request.item, request.ts).ts < request.ts)
    prompt = store.requests(run.run_id)["prompt"].iloc[0]
    item = tables.items.set_index("item").loc[requests[0].item]
    assert f"Candidate: {item['title']} ({item['category']})" in prompt
    assert "Will the user like the candidate product? Answer Yes or No." in prompt
    assert "The user's earlier interactions:\n- " in " ".join(store.requests(run.run_id)["prompt"])


def test_slices_are_stored_with_the_run(clicks_run):
    experiment, store, run = clicks_run
    metrics = store.metrics(run.run_id)
    masks = experiment.slices.masks(experiment.requests())
    for name, mask in masks.items():
        assert metrics[f"requests@{name}"] == mask.sum()
    assert masks["light_users"].sum() + masks["medium_users"].sum() + masks["heavy_users"].sum() + masks[
        "cold_users"
    ].sum() == len(experiment.requests())
    assert metrics["cold_threshold"] == 5 and "auc@cold_items" in metrics and "logloss@heavy_users" in metrics
    baseline = experiment.run_baseline("popularity", store=store)
    assert store.metrics(baseline.run_id)["requests@cold_items"] == metrics["requests@cold_items"]


def test_a_toml_config_and_mhee_eval_run_your_own_file(clicks_csv, tmp_path):
    (tmp_path / "run.toml").write_text(f"""
dataset = "interactions"
backbone = "tiny"
retriever = "recent"
k = 3
prompt_tokens = 400
exit_layers = [3, 6]
train_requests = 40
valid_requests = 30
eval_requests = 30
cold_threshold = 3

[dataset_params]
path = "{clicks_csv.as_posix()}"
user = "visitor"
item = "sku"
timestamp = "time"
label = "clicked"
item_columns = ["title", "category"]

[prompt]
noun = "product"
""")
    env = {**os.environ, "MHEE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "mhee_sdk.cli", "eval", "run.toml", "--store", "runs.duckdb"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "cold items" in done.stdout and "cold: fewer than 3 training interactions" in done.stdout
    store = Store.open(tmp_path / "runs.duckdb", read_only=True)
    (run_id,) = store.runs()["run_id"]
    assert store.run(run_id)["config"]["dataset_params"]["label"] == "clicked"
    assert store.metrics(run_id)["requests"] == 30


# ---------------------------------------------------------------- ids, times, sources
def _write(tmp_path, frame: pd.DataFrame, name: str = "log.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def _log(n: int = 30, **columns) -> pd.DataFrame:
    """A small valid log: 3 users, 4 items, times 1..n, alternating likes."""
    frame = pd.DataFrame({"user": [f"u{i % 3}" for i in range(n)], "item": [f"i{i % 4}" for i in range(n)],
                          "timestamp": np.arange(1, n + 1), "label": [i % 2 for i in range(n)]})  # fmt: skip
    for name, values in columns.items():
        frame[name] = values
    return frame


def test_ids_of_any_type_become_codes_and_the_originals_stay(tmp_path):
    frame = _log(user=["007", "7", "x"] * 10, item=[2.5, 10.0, -1.0, 3.0] * 7 + [2.5, 10.0])
    frame.to_parquet(tmp_path / "log.parquet")  # floats stay floats (a CSV's ids are text, as written)
    tables = InteractionsDataset(tmp_path / "log.parquet", label="label").load()
    assert tables.users["user_id"].tolist() == ["007", "7", "x"] and tables.users["user"].tolist() == [0, 1, 2]
    assert tables.items["item_id"].tolist() == [-1.0, 2.5, 3.0, 10.0] and tables.items["item"].tolist() == [0, 1, 2, 3]
    first = tables.interactions.iloc[0]
    assert (first["user"], first["item"]) == (0, 1)  # "007" and 2.5
    text = InteractionsDataset(_write(tmp_path, frame), label="label").load()
    assert text.users["user_id"].tolist() == ["007", "7", "x"] and text.items["item_id"].tolist()[0] == "-1.0"
    frame.to_json(tmp_path / "log.jsonl", orient="records", lines=True)
    lines = InteractionsDataset(tmp_path / "log.jsonl", label="label").load()
    assert lines.users["user_id"].tolist() == ["007", "7", "x"] and len(lines.interactions) == 30
    compact = InteractionsDataset(_write(tmp_path, _log(user=[5, 6, 7] * 10), "ints.csv"), label="label").load()
    assert sorted(compact.interactions["user"].unique()) == [5, 6, 7]  # compact integer ids are kept


def test_timestamps_dates_floats_and_ties(tmp_path):
    dates = pd.date_range("2024-01-01", periods=30, freq="D").strftime("%Y-%m-%d %H:%M").tolist()
    dates[5] = "2024-01-06"  # another format in one row
    tables = InteractionsDataset(_write(tmp_path, _log(timestamp=dates)), label="label").load()
    assert tables.interactions["ts"].iloc[0] == pd.Timestamp("2024-01-01", tz="UTC").timestamp()
    floats = np.repeat(np.arange(15) + 0.25, 2)  # fractional and tied in pairs: ranks keep both
    tables = InteractionsDataset(_write(tmp_path, _log(timestamp=floats), "f.csv"), label="label").load()
    assert tables.interactions["ts"].tolist() == list(np.repeat(np.arange(1, 16), 2))
    assert tables.interactions["time"].iloc[-1] == 14.25


def test_side_tables_query_and_list_columns(tmp_path):
    log = _write(tmp_path, _log())
    items = pd.DataFrame({"item_id": ["i0", "i1", "i2", "i3", "i9"], "name": list("ABCDE"),
                          "tags": ["x|y", "y", "", "z|x", "q"]})  # fmt: skip
    items.to_parquet(tmp_path / "items.parquet", index=False)
    dataset = InteractionsDataset(
        query=f"SELECT * FROM read_csv('{log.as_posix()}') WHERE timestamp > 0", label="label",
        items_path=tmp_path / "items.parquet", item_key="item_id", item_columns={"title": "name", "tags": "tags"},
        list_columns={"tags": "|"},
    )  # fmt: skip
    tables = dataset.load()
    assert tables.items[["item_id", "title", "tags"]].values.tolist()[0] == ["i0", "A", "x, y"]
    builder = PromptBuilder(tables.users, tables.items, template=dataset.prompt_template)
    assert builder.item_text(0) == "A (x, y)" and builder.item_text(2) == "C"  # empty tags: the shorter template
    with pytest.raises(DataError, match="one SELECT statement"):
        InteractionsDataset(query=f"COPY (SELECT 1) TO '{tmp_path / 'x.csv'}'", label="label").load()


def test_duplicates_keep_the_last_and_warn(tmp_path):
    frame = _log()
    frame = pd.concat([frame, frame.iloc[[4]].assign(label=1 - frame["label"].iloc[4])], ignore_index=True)
    with pytest.warns(DataWarning, match=r"1 rows of log.csv repeat .* \(the first is row 5\); only the last"):
        tables = InteractionsDataset(_write(tmp_path, frame), label="label").load()
    assert len(tables.interactions) == 30
    assert tables.interactions.loc[tables.interactions["ts"] == 5, "label"].item() == 1 - frame["label"].iloc[4]


# ---------------------------------------------------------------- bad input: one clear line
BAD = [
    ("missing column", dict(frame=_log().rename(columns={"user": "user_id"})),
     r"log.csv has no column 'user' \(dataset_params.user; --user in mhee data check\); did you mean 'user_id'\? "
     r"the log has: user_id, item, timestamp, label"),
    ("rating not a number", dict(frame=_log(stars=["4"] * 7 + ["four"] + ["2"] * 22), rating="stars"),
     r"log.csv row 8: the rating in column 'stars' is 'four', not a number; fix the value or drop the row"),
    ("empty timestamp", dict(frame=_log(timestamp=[1.0] * 3 + [np.nan] + [5.0] * 26)),
     r"log.csv row 4: the timestamp is empty"),
    ("unparseable timestamp", dict(frame=_log(timestamp=["2024-01-01"] * 9 + ["yesterday"] + ["2024-01-02"] * 20)),
     r"log.csv row 10: the timestamp 'yesterday' is neither a number nor a date"),
    ("label outside 0/1", dict(frame=_log(label=[0, 1] * 6 + [2] + [0] * 17)),
     r"log.csv row 13: the label in column 'label' is 2, not 0 or 1; map it to 0/1"),
    ("empty file", dict(frame=None), r"log.csv is empty"),
    ("header only", dict(frame=_log().iloc[:0]), r"log.csv has no rows"),
    ("test split empty", dict(frame=_log(timestamp=[*range(1, 25), *[25] * 6])),
     r"30 interactions cannot be split 0.8/0.1/0.1 by time: test would be empty"),
    ("one class in train", dict(frame=_log(label=[1] * 30)), r"every training interaction has label 1"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "spec", "message"), BAD, ids=[case for case, _, _ in BAD])
def test_bad_input_is_one_clear_error(tmp_path, capsys, case, spec, message):
    path = tmp_path / "log.csv"
    if spec["frame"] is None:
        path.write_text("")
    else:
        spec["frame"].to_csv(path, index=False)
    outcome = {"rating": spec["rating"], "like_threshold": 4} if "rating" in spec else {"label": "label"}
    with pytest.raises(DataError, match=message):
        InteractionsDataset(path, **outcome).load()
    flags = ["--rating", spec["rating"], "--like-threshold", "4"] if "rating" in spec else ["--label", "label"]
    assert main(["data", "check", str(path), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_experiment_raises_the_same_message(tmp_path):
    path = _write(tmp_path, _log(label=[0, 1] * 6 + [2] + [0] * 17))
    config = RunConfig(**TINY, dataset="interactions", dataset_params={"path": str(path), "label": "label"})
    with pytest.raises(ValueError, match=r"^log.csv row 13: the label in column 'label' is 2, not 0 or 1; map it"):
        Experiment(config, registry=Registry(load_entry_points=False), progress=False).requests()  # data loads first


def test_mhee_data_check_prints_a_summary_or_one_line(tmp_path):
    frame = pd.concat([_log(), _log().iloc[[3]]], ignore_index=True)
    path = _write(tmp_path, frame)
    ok = subprocess.run([sys.executable, "-m", "mhee_sdk.cli", "data", "check", str(path), "--label", "label", "--cold",
                         "2"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "log.csv: 30 interactions, 3 users, 4 items" in ok.stdout and "liked (label 1): 50.0%" in ok.stdout
    assert "split by time: train 24 (from 1), valid 3 (from 25), test 3 (from 28)" in ok.stdout
    assert ok.stderr.startswith("Warning: 1 rows of log.csv repeat")
    bad = subprocess.run([sys.executable, "-m", "mhee_sdk.cli", "data", "check", str(path), "--label", "lable"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.splitlines() == [
        "Error: log.csv has no column 'lable' (dataset_params.label; --label in mhee data check); did you mean "
        "'label'? the log has: user, item, timestamp, label"
    ]


def test_check_log_counts_cold_users_and_items(tmp_path):
    frame = _log()  # train: ts 1-24, each user 8 times, each item 6 times; valid 25-27; test 28-30
    frame.loc[28, "user"], frame.loc[29, "item"] = "newcomer", "new item"
    summary = check_log(_write(tmp_path, frame), cold_threshold=6, label="label")
    assert (summary.users, summary.items, summary.interactions, summary.splits) == (
        4, 5, 30, {"train": 24, "valid": 3, "test": 3}
    )
    assert summary.cold_users == {"valid": 0.0, "test": pytest.approx(1 / 3)}
    assert summary.cold_items == {"valid": 0.0, "test": pytest.approx(1 / 3)}
    assert check_log(_write(tmp_path, frame), cold_threshold=7, label="label").cold_items["valid"] == 1.0


def test_activity_slices_are_terciles_of_warm_training_users():
    train = pd.DataFrame({"user": np.repeat([1, 2, 3, 4, 5, 6, 7], [5, 6, 7, 10, 20, 30, 2]), "item": 0})
    slices = RequestSlices.from_train(train, threshold=5)
    assert (slices.medium_from, slices.heavy_from) == (7, 20)  # warm counts 5 6 7 10 20 30
    masks = slices.masks_of(np.array([1, 2, 3, 4, 5, 6, 7, 8]), np.zeros(8, dtype=int))
    assert [name for user in range(8) for name, mask in masks.items() if mask[user] and name != "cold_items"] == [
        "light_users", "light_users", "medium_users", "medium_users", "heavy_users", "heavy_users",
        "cold_users", "cold_users",
    ]  # fmt: skip
    assert describe_slices(slices.cut_points()) == (
        "cold: fewer than 5 training interactions; warm users by training interactions (terciles): "
        "light 5-6, medium 7-19, heavy 20+"
    )


def test_prompt_overrides_are_checked(clicks_csv):
    with pytest.raises(ValueError, match=r"prompt keys \['nuon'\] are unknown; known keys: noun, item"):
        RunConfig(prompt={"nuon": "book"})
    with pytest.raises(ValueError, match=r"prompt.question .* uses \{title\}; it may use: \{noun\}, \{yes\}, \{no\}"):
        RunConfig(prompt={"question": "Like {title}?"})
    dataset = InteractionsDataset(clicks_csv, **CLICKS)
    tables = dataset.load()
    with pytest.raises(ValueError, match=r"prompt.item '\{titel\}' names column 'titel'; the items table has: id, "):
        PromptBuilder(tables.users, tables.items, template=dataset.prompt_template.with_overrides({"item": "{titel}"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the clicks log loads cleanly
        InteractionsDataset(clicks_csv, **CLICKS).load()
