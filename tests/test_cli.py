"""`mhee`: starts without heavy imports, one-line errors without tracebacks, JSON results, quiet and plain progress.

Times are CPU seconds of the child process (what a quiet machine's wall clock would be), so the bounds
hold on a loaded test machine too.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from mhee_sdk import cli
from mhee_sdk.progress import LineProgress, progress_bar, silenced
from mhee_sdk.registry import reset_registry

HEAVY = {"torch", "transformers", "pandas", "duckdb", "sklearn", "matplotlib", "numpy", "scipy"}
TINY_RUN = """\
name = "cli tiny"
backbone = "tiny"
retriever = "recent"
k = 3
prompt_tokens = 600
head = "linear"
exit_layers = [2, 4, 6]
policy = "max-prob"
policy_params = { threshold = 0.6 }
dataset_params = { fractions = [0.9985, 0.001, 0.0005] }  # a 50-request test split
train_requests = 40
valid_requests = 40
eval_requests = 60
batch_size = 16
"""


def mhee(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``python -m mhee_sdk.cli ARGS``; returns the result and the CPU seconds it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(
        [sys.executable, "-m", "mhee_sdk.cli", *args],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600,
    )  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return result, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def assert_one_error_line(stderr: str, *words: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private $MHEE_HOME (own hidden-state cache) that sees the installed model and data."""
    from mhee_sdk import assets

    real, private = assets.home(), tmp_path / "home"
    private.mkdir()
    for name in ("data", "models", "gguf", "wheels"):
        if (real / name).exists():
            (private / name).symlink_to(real / name)
    monkeypatch.setenv("MHEE_HOME", str(private))
    return private


@pytest.fixture
def fresh_registry():
    """The process-wide registry is rebuilt from the environment this test sets, and forgotten afterwards."""
    reset_registry()
    yield
    reset_registry()


# --------------------------------------------------------------------------- start-up
@pytest.mark.parametrize("args", [["--help"], ["eval", "--help"], ["demo", "--help"]])
def test_help_imports_nothing_heavy(args):
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "mhee_sdk.cli", *args],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "mhee_sdk.validation" in imported  # what the CLI module imports (it runs as __main__ itself)
    assert not {name.split(".")[0] for name in imported} & HEAVY
    if args != ["--help"]:
        assert "examples:" in result.stdout and f"mhee {args[0]} " in result.stdout


def test_config_and_light_public_names_import_without_torch():
    code = (
        "import sys\nimport mhee_sdk.config\n"
        "from mhee_sdk import ConfigError, Knob, Registry, Request, RunConfig, hookimpl, hookspec\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not set(result.stdout.split()) & HEAVY
    assert "pluggy" in result.stdout.split()


def test_help_is_fast_and_version_is_printed():
    result, cpu = mhee("--help")
    assert result.returncode == 0 and "COMMAND" in result.stdout
    assert cpu < 0.5, f"`mhee --help` used {cpu:.2f} CPU seconds"
    result, _ = mhee("--version")
    assert result.stdout.strip() == f"mhee {version('mhee-sdk')}"


# --------------------------------------------------------------------------- errors without the registry
@pytest.mark.parametrize(
    ("setup", "args", "words"),
    [
        (None, ["eval", "missing.toml"], ["config file 'missing.toml' not found; check the path"]),
        ("folder", ["eval", "cfg"], ["is a folder; give the path of a TOML config file"]),
        ('policy = "max-prob\n', ["eval", "run.toml"], ["run.toml is not valid TOML", "fix the syntax"]),
        (None, ["report", "--store", "nope.duckdb"], ["store file 'nope.duckdb' not found", "mhee eval"]),
        ("", ["eval", "run.toml", "--store", "no/such/folder/runs.duckdb"], ["folder 'no/such/folder'", "create it"]),
    ],
    ids=["missing config", "config is a folder", "bad TOML", "missing store", "store in a missing folder"],
)
def test_file_errors_are_one_line_and_fast(setup, args, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if setup == "folder":
        (tmp_path / "cfg").mkdir()
    elif setup is not None:
        (tmp_path / "run.toml").write_text(setup)
    result, cpu = mhee(*args)
    assert result.returncode == 1
    assert_one_error_line(result.stderr, *words)
    assert cpu < 2.0, f"{cpu:.2f} CPU seconds"


def test_usage_errors_exit_2_with_one_line():
    result, _ = mhee("evl", "run.toml")
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "invalid choice: 'evl'", "(did you mean 'eval'?)", "see `mhee --help`")
    result, _ = mhee("demo", "--samples", "many")
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "--samples: 'many' is not a whole number", "see `mhee demo --help`")


# --------------------------------------------------------------------------- config errors, no model loaded
def test_config_errors_name_every_problem_before_any_model_loads(tmp_path):
    """The issue's case: a wrong policy in a config naming the real backbone fails at once, SmolLM2 untouched."""
    config = tmp_path / "run.toml"
    config.write_text('backbone = "smollm2-135m"\npolicy = "maxprob"\nretriver = "gcn"\n'
                      'head = "hybrid"\nhead_params = { rnak = 4 }\nbatch_size = "32"\n')  # fmt: skip
    probe = (
        "import sys\nfrom mhee_sdk.cli import main\ncode = main(sys.argv[1:])\n"
        "print('loaded:', sorted(m for m in ('transformers', 'safetensors', 'tokenizers') if m in sys.modules), "
        "file=sys.stderr)\nsys.exit(code)\n"
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run([sys.executable, "-c", probe, "eval", str(config), "--store", str(tmp_path / "r.duckdb")],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    error, loaded = result.stderr.strip().splitlines()
    assert result.returncode == 1 and loaded == "loaded: []"  # no model, tokenizer or weights file was opened
    assert_one_error_line(
        error, "run.toml: 4 problems", "unknown config key 'retriver' (did you mean 'retriever'?)",
        "batch_size='32' must be an integer", "head 'hybrid' has no parameter 'rnak' (did you mean 'rank'?)",
        "exit policy 'maxprob' is unknown", "(did you mean 'max-prob'?)",
    )  # fmt: skip
    assert not (tmp_path / "r.duckdb").exists()  # nothing written either
    # the plugin registry (which imports torch) is the whole cost: a few CPU seconds, not minutes of data and model
    assert cpu < 30, f"{cpu:.1f} CPU seconds"


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ('retriver = "gcn"\n', ["unknown config key 'retriver' (did you mean 'retriever'?)"]),
        ("seed = 1.5\n", ["seed=1.5 must be an integer"]),
        ('policy = "maxprob"\n', ["exit policy 'maxprob' is unknown", "did you mean 'max-prob'?"]),
        ('policy = "max-prob"\npolicy_params = { treshold = 0.8 }\n', ["no parameter 'treshold'", "'threshold'?"]),
        ('policy = "multi-head"\npolicy_params = { window = 1.7 }\n', ["window=1.7 must be an integer"]),
    ],
    ids=["unknown key", "bad type", "unknown policy", "bad parameter name", "bad parameter type"],
)
def test_config_errors_in_process(toml, words, tmp_path, capsys):
    (tmp_path / "run.toml").write_text(toml)
    assert cli.main(["eval", str(tmp_path / "run.toml"), "--store", str(tmp_path / "r.duckdb")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_error_line(captured.err, *words)


def test_plugin_environment_errors_are_one_line(monkeypatch, capsys, fresh_registry):
    monkeypatch.setenv("MHEE_STRICT_PLUGINS", "2")
    assert cli.main(["plugins"]) == 1
    assert_one_error_line(capsys.readouterr().err, "MHEE_STRICT_PLUGINS='2' is not a flag; use 1 (on) or 0 (off)")
    reset_registry()
    monkeypatch.setenv("MHEE_STRICT_PLUGINS", "1")
    monkeypatch.setenv("MHEE_PLUGINS", "nonexistent")
    assert cli.main(["plugins", "--json"]) == 1
    assert_one_error_line(capsys.readouterr().err, "MHEE_PLUGINS / allow names 'nonexistent', which no plugin has")
    reset_registry()
    monkeypatch.delenv("MHEE_STRICT_PLUGINS")
    assert cli.main(["plugins", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["entries"]  # the built-ins still load
    assert captured.err.startswith("Warning: mhee_sdk: MHEE_PLUGINS / allow names 'nonexistent'")
    assert len(captured.err.strip().splitlines()) == 1


def test_bugs_get_a_short_message_and_debug_shows_the_traceback(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "cmd_plugins", broken)
    assert cli.main(["plugins"]) == 1
    assert_one_error_line(capsys.readouterr().err, "internal error (RuntimeError: boom); run with --debug")
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["plugins", "--debug"])
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["--debug", "plugins"])


def test_broken_pipe_prints_no_traceback():
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte, as `| head -1` is after its line
    try:
        result = subprocess.run([sys.executable, "-m", "mhee_sdk.cli", "plugins", "--json"], stdout=write,
                                stderr=subprocess.PIPE, text=True, timeout=600)  # fmt: skip
    finally:
        os.close(write)
    assert result.returncode == cli.BROKEN_PIPE_STATUS and result.stderr == ""
    pipeline = f"'{sys.executable}' -m mhee_sdk.cli plugins --json | head -1"
    result = subprocess.run(["bash", "-c", pipeline], capture_output=True, text=True, timeout=600)
    assert result.stdout == "{\n" and result.stderr == ""


# --------------------------------------------------------------------------- results
def test_eval_json_quiet_report_and_name(tmp_path, home, capsys):
    config, store = tmp_path / "run.toml", tmp_path / "runs.duckdb"
    config.write_text(TINY_RUN)
    assert cli.main(["eval", str(config), "--store", str(store), "--json"]) == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)  # stdout holds the JSON alone
    assert payload["run"]["name"] == "cli tiny"  # the config's name is the run's name
    size = int(payload["run"]["requests"])  # the test split is about 0.05% of 100,000 ratings
    assert 30 < size < 60 and 0 <= payload["metrics"]["auc"] <= 1
    clamp = f"split 'test' has {size} requests: eval_requests=60 was clamped to {size}"
    assert payload["notes"] == [clamp]
    progress = captured.err.splitlines()
    assert f"Note: {clamp}" in progress
    assert any(line.startswith("hidden states: ") and "(100%)" in line for line in progress)  # plain lines
    assert "\r" not in captured.err

    assert cli.main(["eval", str(config), "--store", str(store), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.splitlines()[1].startswith("cli tiny ")

    assert cli.main(["report", "--store", str(store), "--out", str(tmp_path / "plots"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [run["name"] for run in report["runs"]] == ["cli tiny", "cli tiny"]
    assert all(Path(path).is_file() for path in report["plots"])


def test_report_of_an_empty_store_is_an_error(tmp_path, capsys):
    from mhee_sdk.store import Store

    Store.open(tmp_path / "empty.duckdb")
    assert cli.main(["report", "--store", str(tmp_path / "empty.duckdb")]) == 1
    assert_one_error_line(capsys.readouterr().err, "no finished runs in", "mhee eval CONFIG")


def test_documented_tiny_demo_runs(tmp_path, home, capsys):
    """`mhee demo --backbone tiny --samples 20` (docs): the prompt budget follows the byte-level tokenizer."""
    args = ["demo", "--backbone", "tiny", "--samples", "20", "--train-requests", "60", "--valid-requests", "40"]
    assert cli.main([*args, "--out", str(tmp_path / "demo"), "--json"]) == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    names = [run["name"] for run in payload["runs"]]
    assert names[0] == "full depth" and "collab-logistic" in names and len(names) == 10
    assert all(run["requests"] == 20 for run in payload["runs"])
    assert "prompt budget 5" in captured.err  # 160 SmolLM2 tokens of text are ~560 bytes


def test_demo_prompt_budget_holds_the_same_text():
    from mhee_sdk.data.prompt import approx_tokens
    from mhee_sdk.demo import DEMO_CONFIG, PROMPT_SAMPLE, demo_prompt_tokens

    assert demo_prompt_tokens("smollm2-135m")[0] == DEMO_CONFIG.prompt_tokens  # the README's numbers stay put
    budget, why = demo_prompt_tokens("tiny")
    assert budget >= len(PROMPT_SAMPLE.encode()) * DEMO_CONFIG.prompt_tokens / approx_tokens(PROMPT_SAMPLE) - 1
    assert "'tiny'" in why


# --------------------------------------------------------------------------- progress
def test_progress_without_a_terminal_is_plain_lines(capsys):
    bar = progress_bar(total=100, desc="hidden states")
    assert isinstance(bar, LineProgress)  # capsys' stderr is no terminal, as in a log file or CI
    with bar:
        for _ in range(100):
            bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(", ")[0] for line in lines] == [
        f"hidden states: {n}/100 it ({n}%)" for n in range(10, 101, 10)
    ]
    assert list(progress_bar(range(3), desc="epochs", unit="epoch")) == [0, 1, 2]
    assert capsys.readouterr().err.startswith("epochs: 1/3 epoch (33%)")
    for bar in (progress_bar(total=5, enabled=False), *_silenced_bar()):
        bar.update(5)
        bar.close()
    assert capsys.readouterr().err == ""


def _silenced_bar():
    with silenced():
        return [progress_bar(total=5, desc="quiet")]


@pytest.mark.parametrize("command", [["store", "repair"], ["assets", "verify"]])
def test_maintenance_commands(command, tmp_path, monkeypatch, capsys):
    from mhee_sdk import assets
    from mhee_sdk.store import Store

    if not hasattr(Store, "repair") or not hasattr(assets, "verify"):
        pytest.skip("Store.repair / assets.verify arrive with the store-reliability branch")
    monkeypatch.chdir(tmp_path)
    if command[0] == "store":
        Store.open(tmp_path / "mhee_runs.duckdb")
        assert cli.main(command) == 0
        assert "no abandoned runs" in capsys.readouterr().out
    else:
        status = cli.main([*command, "movielens-100k"])
        assert status in (0, 1) and "Traceback" not in capsys.readouterr().err
