"""Command-line overrides: ``KEY=VALUE`` after the config (YAML values, dotted paths, checked by the schema with a
"did you mean"), ``--storage`` and ``$YOLOPRUNE_STORAGE`` (flag over environment over file), ``report --open`` and
``yoloprune schema``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml

from yoloprune.cli import _load_config, _parser, main
from yoloprune.config import load_config, parse_assignments
from yoloprune.errors import ConfigError

optuna.logging.set_verbosity(optuna.logging.WARNING)

RAW = {
    "name": "ov",
    "model": "yolov8n.yaml",
    "data": "data.yaml",
    "space": {"ratios": {"backbone.p3": {"low": 0.1, "high": 0.4}, "neck": 0.2}},
    "targets": [{"name": "cpu", "backend": "onnxruntime"}],
    "finetune": {"epochs": 2, "overrides": {"seed": 1}},
}


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**RAW, "output": str(tmp_path / "out")}))
    return path


def _cli_config(*argv: str):
    """The config a command line loads, without running the command."""
    return _load_config(_parser().parse_args(["results", *argv]))


def test_values_are_yaml():
    assert parse_assignments(["budget.trials=50", "engine.sampler=random", "finetune.overrides={lr0: 0.01}",
                              "cost_target.value=[0.3, 0.5]", "storage=", "device='0'", "x.y=a=b"]) == [
        ("budget.trials", 50), ("engine.sampler", "random"), ("finetune.overrides", {"lr0": 0.01}),
        ("cost_target.value", [0.3, 0.5]), ("storage", None), ("device", "0"), ("x.y", "a=b"),
    ]  # fmt: skip


def test_overrides_set_nested_values_list_items_and_dotted_stage_names(cfg):
    config = load_config(cfg, assignments=parse_assignments([
        "budget.trials=7", "finetune.epochs=5", "finetune.overrides.lr0=0.01", "targets.0.threads=2",
        "space.ratios.backbone.p3.high=0.5", "space.ratios.backbone.p4=0.3", "engine.workers.grace_s=99",
        "engine.nni_tuner=random",  # a key of earlier versions still goes to its section
    ]))  # fmt: skip
    assert config.budget.trials == 7 and config.finetune.epochs == 5
    assert config.finetune.overrides == {"seed": 1, "lr0": 0.01}  # a dotted key adds to the mapping
    assert (
        config.targets[0].threads == 2 and config.engine.workers.grace_s == 99 and config.engine.nni.tuner == "random"
    )
    assert config.space.ratios["backbone.p3"].high == 0.5 and config.space.ratios["backbone.p4"] == 0.3
    # A mapping value replaces the mapping; the file's other values stay.
    config = load_config(cfg, assignments=[("finetune.overrides", {"lr0": 0.02})])
    assert config.finetune.overrides == {"lr0": 0.02} and config.finetune.epochs == 2


def test_command_line_paths_are_relative_to_the_current_directory(cfg, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    config = load_config(cfg, assignments=[("storage", "sqlite:///s.db"), ("output", "o"), ("data", "d/x.yaml")])
    assert config.storage == f"sqlite:///{work / 's.db'}" and config.output == str(work / "o")
    assert config.data == str(work / "d/x.yaml")


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (["foo"], "'foo' is not a KEY=VALUE override"),
        (["=5"], "'=5' is not a KEY=VALUE override"),
        (["a b=1"], "is not a KEY=VALUE override"),
        (["finetune.overrides={lr0: 0.01"], "'{lr0: 0.01' is not a YAML value"),
        (["targets.x=1"], "'targets' is a list: give an index, e.g. targets.0.x"),
        (["targets.3.device=cuda"], "'targets' has 1 item(s), no index 3"),
        (["model.weights=w.pt"], "'model' is 'yolov8n.yaml', not a section"),
        (["finetune.epoch=5"], "unknown key 'finetune.epoch'. Did you mean 'epochs'?"),
        (["budget.trials=0"], "budget.trials: Input should be greater than or equal to 1"),
    ],
)
def test_bad_overrides_name_the_token(cfg, tokens, message):
    with pytest.raises(ConfigError) as e:
        load_config(cfg, assignments=parse_assignments(tokens))
    assert message in str(e.value)


def test_a_typo_fails_through_the_cli_with_did_you_mean(cfg, capsys):
    assert main(["results", str(cfg), "finetune.epoch=5"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'finetune.epoch'. Did you mean 'epochs'?" in err and "with finetune.epoch" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["results", "{cfg}", "--all", "foo"], "'foo' is not a KEY=VALUE override"),
        (["search", "{cfg}", "--trials", "3", "budget.trials=4"], "budget.trials given twice"),
        (["results", "{cfg}", "--storage", "sqlite:///a.db", "storage=sqlite:///b.db"], "storage given twice"),
    ],
)
def test_malformed_or_repeated_tokens_exit_2(cfg, capsys, argv, message):
    assert main([a.format(cfg=cfg) for a in argv]) == 2
    assert message in capsys.readouterr().err


def test_overrides_may_follow_options_and_other_arguments_stay_errors(cfg, capsys):
    assert main(["results", str(cfg), "budget.trials=3", "--all", "finetune.epoch=5"]) == 2
    assert "unknown key 'finetune.epoch'" in capsys.readouterr().err  # read, though after --all
    for argv in (["results", str(cfg), "--bogus"], ["stages", "yolov8n.yaml", "imgsz=320"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_storage_precedence_flag_then_environment_then_file(tmp_path, monkeypatch):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**RAW, "storage": "sqlite:////file.db"}))
    assert _cli_config(str(path)).storage == "sqlite:////file.db"
    monkeypatch.setenv("YOLOPRUNE_STORAGE", "sqlite:////env.db")
    assert _cli_config(str(path)).storage == "sqlite:////env.db"
    assert _cli_config(str(path), "--storage", "sqlite:////flag.db").storage == "sqlite:////flag.db"
    assert _cli_config(str(path), "storage=sqlite:////key.db").storage == "sqlite:////key.db"
    monkeypatch.setenv("YOLOPRUNE_STORAGE", "")  # empty: unset
    assert _cli_config(str(path)).storage == "sqlite:////file.db"


def _study(url: str) -> None:
    """Two finished trials written with plain Optuna at ``url`` (no training)."""
    study = optuna.create_study(study_name="ov", storage=url, directions=["maximize", "minimize"])
    for ratio in (0.2, 0.4):
        metrics = {"map50_95": 0.5 - ratio / 10, "map50_95_drop": ratio / 10, "gflops": 8 * (1 - ratio)}
        trial = optuna.trial.create_trial(
            params={"ratio.neck": ratio},
            distributions={"ratio.neck": optuna.distributions.FloatDistribution(0.1, 0.6)},
            values=[metrics["map50_95"], metrics["gflops"]],
            user_attrs={"metrics": metrics, "feasible": True, "reward": 1 - ratio},
        )
        study.add_trial(trial)


def test_results_reads_the_study_named_by_the_environment(tmp_path, monkeypatch, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**RAW, "targets": [], "output": str(tmp_path / "out")}))
    url = f"sqlite:///{tmp_path / 'elsewhere' / 'shared.db'}"
    (tmp_path / "elsewhere").mkdir()
    _study(url)
    assert main(["results", str(path)]) == 2  # the default storage holds no such search
    assert "no search named 'ov'" in capsys.readouterr().err
    monkeypatch.setenv("YOLOPRUNE_STORAGE", url)
    assert main(["results", str(path)]) == 0
    assert "experiment 'ov': 2 complete" in capsys.readouterr().out
    assert (tmp_path / "out" / "trials.csv").exists()


def test_db_messages_hide_the_password(capsys):
    url = "postgresql://search:s3cret-pw@127.0.0.1:1/yoloprune"  # nothing listens on port 1
    assert main(["db", "check", "--storage", url]) == 2
    err = capsys.readouterr().err
    assert "s3cret-pw" not in err and "search:***@127.0.0.1" in err


def test_results_messages_hide_the_password(cfg, monkeypatch, capsys):
    monkeypatch.setenv("YOLOPRUNE_STORAGE", "postgresql://search:s3cret-pw@127.0.0.1:1/yoloprune")
    assert main(["results", str(cfg)]) == 2
    assert "s3cret-pw" not in capsys.readouterr().err


def test_report_open_opens_the_page_in_the_browser(cfg, tmp_path, monkeypatch, capsys):
    import webbrowser

    import yoloprune.search.report as report

    page = tmp_path / "out" / "report.html"
    fake = SimpleNamespace(path=page, csv=tmp_path / "out" / "trials.csv", figures=[], trial=0)
    monkeypatch.setattr(report, "write_report", lambda config, **options: fake)
    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url: opened.append(url) or True)
    assert main(["report", str(cfg)]) == 0 and opened == []
    assert main(["report", str(cfg), "--open"]) == 0
    assert opened == [page.resolve().as_uri()]
    monkeypatch.setattr(webbrowser, "open", lambda url: False)  # no browser here (a server, SSH)
    assert main(["report", str(cfg), "--open"]) == 0
    assert f"open {page.resolve().as_uri()} yourself" in capsys.readouterr().out


def test_schema_command_prints_the_config_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$schema"].endswith("2020-12/schema") and schema["additionalProperties"] is False
    assert {"name", "model", "data", "space"} <= set(schema["required"])
    assert {"engine", "finetune", "targets", "storage"} <= set(schema["properties"])
    engine = schema["$defs"]["EngineConfig"]["properties"]
    assert {"nni", "workers", "sampler"} <= set(engine)
    targets = schema["properties"]["targets"]["items"]["oneOf"]  # the local/remote union
    assert {t["$ref"] for t in targets} == {"#/$defs/LocalTarget", "#/$defs/RemoteTarget"}
