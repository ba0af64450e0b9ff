"""Strict configs: every key, type, plugin name and plugin parameter checked in one pass, before any work."""

from __future__ import annotations

import pytest

from mhee_sdk.config import RunConfig
from mhee_sdk.evaluation import Experiment
from mhee_sdk.registry import ParameterError
from mhee_sdk.validation import ConfigError, check_params, did_you_mean, validate_config, value_problem

# the issue's cases ("Configs and plugins"): each config -> the words its one problem must contain
ISSUE_CASES = [
    ({"name": 5}, "name=5 must be a string"),
    ({"batch_size": True}, "batch_size=true must be an integer, not true/false"),
    ({"policy": "multi-head", "policy_params": {"window": 1.7}}, "window=1.7 must be an integer"),
    ({"backbone": "tiny", "policy": "fixed-layer", "policy_params": {"layer": 100}},
     "layer=100 is beyond the deepest exit layer 6 of backbone 'tiny' (it would never exit early); choose one of 3, 6"),
    ({"eval_requests": 1e9}, "eval_requests=1e+09 must be an integer (no decimal point"),
    ({"head": "hybrid", "head_params": {"rnak": 4}}, "head 'hybrid' has no parameter 'rnak' (did you mean 'rank'?)"),
    ({"head": "mlp", "head_params": {"widht": 64}}, "head 'mlp' has no parameter 'widht' (did you mean 'width'?)"),
    ({"seed": -1}, "seed=-1 must be a non-negative integer"),
    ({"seed": "abc"}, "seed='abc' must be an integer, not a string"),
    ({"seed": 1.5}, "seed=1.5 must be an integer"),
    ({"exit_layers": "3,6"}, "exit_layers='3,6' must be a list of integers, not a string (write exit_layers = [3, 6])"),
    ({"dataset_params": {"like_threshold": "4"}}, "like_threshold='4' must be a number, not a string (drop the"),
    ({"policy": "max-prob", "policy_params": {"threshold": "0.8"}}, "threshold='0.8' must be a number, not a string"),
]


@pytest.mark.parametrize(("values", "expected"), ISSUE_CASES, ids=[str(c[0]) for c in ISSUE_CASES])
def test_each_issue_case_is_one_clear_problem(values, expected, registry):
    problems = validate_config(values, registry)  # default backbone: the real SmolLM2, which is never loaded
    assert len(problems) == 1 and expected in problems[0], problems


def test_the_real_backbones_depth_is_read_without_loading_it(registry):
    from mhee_sdk import assets

    if not (assets.home() / assets.MODEL_FOLDER / "config.json").is_file():
        pytest.skip("SmolLM2 is not installed (`mhee assets install`): its depth is then checked once it loads")
    problems = validate_config({"policy": "fixed-layer", "policy_params": {"layer": 100}}, registry)
    assert problems == [
        "policy_params of exit policy 'fixed-layer': layer=100 is beyond the deepest exit layer 30 of backbone "
        "'smollm2-135m' (it would never exit early); choose one of 3, 6, 9, 12, 15, 18, 21, 24, 27, 30"
    ]


def test_all_problems_are_reported_at_once_with_did_you_mean(registry):
    values = {
        "retriver": "gcn", "seed": -1, "policy": "maxprob", "batch_size": "32",
        "backbone": "tiny", "backbone_params": {"num_layer": 3}, "head_params": {"layer": 2},
    }  # fmt: skip
    problems = validate_config(values, registry)
    assert problems == [
        "unknown config key 'retriver' (did you mean 'retriever'?)",
        "batch_size='32' must be an integer, not a string (drop the quotes)",
        "seed=-1 must be a non-negative integer",
        "backbone_params of backbone 'tiny' has no parameter 'num_layer' (did you mean 'num_layers'?)",
        "head_params of exit head 'linear': 'layer' is set by mhee itself; remove it",
        "exit policy 'maxprob' is unknown; choose from: calibrated, entropy, fixed-layer, margin, max-prob, "
        "multi-head, never, patience (did you mean 'max-prob'?)",
    ]
    with pytest.raises(ConfigError, match=r"^run.toml: 6 problems: \(1\) unknown config key 'retriver'"):
        raise ConfigError(problems, "run.toml")


def test_policies_check_their_own_ranges_and_layers_follow_the_backbone(registry):
    assert validate_config({"policy": "max-prob", "policy_params": {"threshold": 0.3}}, registry) == [
        "policy_params of exit policy 'max-prob': threshold=0.3 is outside [0.5, 1.0]"
    ]
    # the tiny backbone has 6 layers (its num_layers parameter); the config's exit layers bound the policy
    tiny = {"backbone": "tiny", "policy": "fixed-layer", "policy_params": {"layer": 5}}
    assert validate_config(tiny, registry) == []
    assert "deepest exit layer 4 of backbone 'tiny'" in validate_config({**tiny, "exit_layers": [2, 4]}, registry)[0]
    assert validate_config({"backbone": "tiny", "exit_layers": [3, 9]}, registry) == [
        "exit_layers [3, 9] must lie within 1..6, the layers of backbone 'tiny'"
    ]
    deeper = {**tiny, "backbone_params": {"num_layers": 12}, "policy_params": {"layer": 12}}
    assert validate_config(deeper, registry) == []
    # a backbone whose depth is known only once loaded: checked with num_layers (what `mhee eval` does after loading)
    assert "deepest exit layer 6" in validate_config(
        {"backbone": "tiny", "policy": "fixed-layer", "policy_params": {"layer": 8}}, registry, num_layers=6
    )[0]


def test_run_config_itself_rejects_bad_values_and_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'polcy' \(did you mean 'policy'\?\)"):
        RunConfig.from_dict({"polcy": "never"})
    with pytest.raises(ConfigError, match=r"2 problems: \(1\) k=-1 must be a non-negative integer; \(2\) split 'dev'"):
        RunConfig(k=-1, split="dev")
    with pytest.raises(ValueError, match="batch_size=0 must be a positive integer"):
        RunConfig(batch_size=0)
    assert RunConfig(exit_layers=(3, 6), name="mine").label == "mine"  # a tuple is a fine list in Python


def test_experiment_validates_before_loading_anything(registry, monkeypatch):
    from mhee_sdk.data.movielens import MovieLens100K

    def no_data(self):
        raise AssertionError("data loaded before the config was checked")

    monkeypatch.setattr(MovieLens100K, "load", no_data)
    with pytest.raises(ConfigError, match=r"exit policy 'maxprob' is unknown.*did you mean 'max-prob'"):
        Experiment(RunConfig(policy="maxprob"), registry=registry)


def test_value_checks_follow_annotations():
    assert value_problem(3, "int", "k") is None
    assert value_problem(3, "float", "lr") is None  # an integer is a fine number
    assert value_problem(True, "float", "lr") == "lr=true must be a number, not true/false"
    assert value_problem(1.0, "int", "k") == "k=1.0 must be an integer (no decimal point or exponent)"
    assert value_problem(None, "str | None", "device") is None
    assert value_problem([0.8, 0.1, 0.1], "tuple[float, float, float]", "fractions") is None
    assert value_problem([0.8, 0.2], "tuple[float, float, float]", "fractions") == (
        "fractions=[0.8, 0.2] must be a list of 3 numbers"
    )
    assert value_problem(object(), "Adapter | str | None", "adapter") is None  # a class of its own: not checked
    assert value_problem({"3": 0.9}, "dict[int, float]", "thresholds") is None  # stored keys are text


def test_check_params_names_and_kwargs():
    def factory(spec: str, threshold: float = 0.5, *, window: int = 2) -> None: ...

    assert check_params(factory, {"treshold": 0.7}, "policy 'x'", supplied=["spec"]) == [
        "policy 'x' has no parameter 'treshold' (did you mean 'threshold'?)"
    ]
    assert check_params(factory, {"spec": "a", "windw": 1}, "p", supplied=["spec"]) == [
        "p: 'spec' is set by mhee itself; remove it",
        "p has no parameter 'windw' (did you mean 'window'?)",
    ]
    assert check_params(factory, {}, "p") == ["p needs the parameter 'spec'"]
    assert check_params(lambda **kwargs: None, {"anything": 1}, "p") == []
    assert did_you_mean("retriver", ["retriever", "k"]) == " (did you mean 'retriever'?)"
    assert did_you_mean("zzz", ["retriever"]) == ""


def test_registry_create_names_a_misspelled_parameter(registry):
    with pytest.raises(ParameterError, match=r"exit policy 'max-prob' has no parameter 'treshold' \(did you mean"):
        registry.create("exit_policy", "max-prob", treshold=0.7)
    with pytest.raises(TypeError):  # ParameterError stays a TypeError for callers that catch that
        registry.create("exit_policy", "max-prob", treshold=0.7)


def test_no_builtin_factory_swallows_unknown_parameters(registry):
    """Every built-in factory rejects a parameter it does not know (no ``**_``), so a typo cannot pass silently."""
    swallowing = []
    for kind in ("dataset", "retriever", "backbone", "exit_head", "exit_policy", "baseline"):
        for name, entry in registry.entries[kind].items():
            if not check_params(entry.factory, {"surely_not_a_parameter": 1}, name, types=False):
                swallowing.append((kind, name))
    assert swallowing == [("baseline", "gcn-score")]  # forwards to GCNRetriever, which rejects it when built
    with pytest.raises(TypeError, match="surely_not_a_parameter"):
        registry.entries["baseline"]["gcn-score"].factory(surely_not_a_parameter=1)
