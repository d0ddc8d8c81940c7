"""The experiment config: typed, validated, unknown keys refused, paths resolved against the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from yoloprune.config import ExperimentConfig, config_from_dict, load_config
from yoloprune.demo import DEMO_EXPERIMENT
from yoloprune.errors import ConfigError

EXPERIMENTS = Path(__file__).parents[1] / "experiments"

MINIMAL = {
    "name": "t",
    "model": "yolov8n.yaml",
    "data": "data.yaml",
    "space": {"ratios": {"neck": {"low": 0.1, "high": 0.4}}},
}


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_demo_yaml_is_the_demo_config():
    from_file = load_config(EXPERIMENTS / "demo.yaml")
    assert from_file.model_dump(exclude={"output"}) == config_from_dict(DEMO_EXPERIMENT).model_dump(exclude={"output"})


def test_example_configs_validate():
    trt = load_config(EXPERIMENTS / "remote_trt.yaml")
    assert [t.backend for t in trt.targets] == ["remote", "onnxruntime"]
    assert trt.targets[0].cafile == str(EXPERIMENTS / "../certs/jetson-cert.pem")  # beside the config
    assert trt.objectives[1].metric == "latency_ms.jetson_trt_fp16" and trt.constraints[1].on_cost
    byo = load_config(EXPERIMENTS / "byo.yaml")
    assert byo.space.importance == ["l1", "bn_scale"] and byo.constraints[0].max == 0.02
    assert Path(byo.data).is_absolute() and byo.output_dir.name == "my-detector-pruning"


def test_method_example_configs_validate():
    from yoloprune.registry import SEARCH_METHODS

    configs = {p.stem: load_config(p) for p in sorted((EXPERIMENTS / "methods").glob("*.yaml"))}
    assert set(configs) == set(SEARCH_METHODS.names())  # one example per registered method
    for name, cfg in configs.items():
        assert cfg.engine.sampler == name and cfg.cost_target is not None
        assert cfg.cost_target.values == ([0.5] if name == "cmaes" else [0.3, 0.5])


def test_defaults_are_the_issue_defaults():
    cfg = config_from_dict(MINIMAL)
    assert [(o.metric, o.direction) for o in cfg.objectives] == [("map50_95", "maximize"), ("gflops", "minimize")]
    assert [c.describe() for c in cfg.constraints] == ["map50_95_drop <= 0.02", "flops_reduction >= 0.5"]
    assert cfg.engine.sampler == "tpe" and cfg.budget.trials == 20
    assert cfg.storage_url == f"sqlite:///{cfg.output_dir / 'study.db'}"
    with pytest.raises(Exception):  # noqa: B017  frozen
        cfg.imgsz = 320  # type: ignore[misc]


def test_latency_targets_make_latency_the_default_objective():
    cfg = config_from_dict({**MINIMAL, "targets": [{"name": "x86", "backend": "onnxruntime", "threads": 2}]})
    assert [o.metric for o in cfg.objectives] == ["map50_95", "latency_ms.x86"]
    assert cfg.targets[0].imgsz is None and cfg.targets[0].cv_target == 0.05
    with pytest.raises(ConfigError, match="names latency target 'jetson', which is not configured"):
        config_from_dict({**MINIMAL, "constraints": [{"metric": "latency_ratio.jetson", "max": 0.8}]})
    with pytest.raises(ConfigError, match="unknown latency backend 'tensorrtt'"):
        config_from_dict({**MINIMAL, "targets": [{"name": "a", "backend": "tensorrtt"}]})
    with pytest.raises(ConfigError, match="target names repeat"):
        config_from_dict({**MINIMAL, "targets": [{"name": "a"}, {"name": "a"}]})


def test_relative_paths_follow_the_config_file(tmp_path):
    (tmp_path / "data.yaml").write_text("x: 1")
    cfg = load_config(_write(tmp_path, {**MINIMAL, "output": "out", "storage": "sqlite:///db/s.db"}))
    assert cfg.data == str(tmp_path / "data.yaml")
    assert cfg.model == "yolov8n.yaml"  # a shipped Ultralytics name stays a name
    assert cfg.output_dir == tmp_path / "out"
    assert cfg.storage_url == f"sqlite:///{tmp_path / 'db' / 's.db'}"


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"finetune": {"epoch": 3}}, "unknown key 'finetune.epoch'. Did you mean 'epochs'?"),
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"space": {"ratios": {"neck": {"low": 0.5, "high": 0.2}}}}, "low 0.5 is greater than high 0.2"),
        ({"space": {"ratios": {"neck": {"low": 0.1, "high": 0.97}}}}, "must lie inside [0, 0.95)"),
        ({"space": {"ratios": {"neck": 1.2}}}, "outside [0, 0.95)"),
        ({"space": {"ratios": {}}}, "at least one stage"),
        ({"space": {"ratios": {"neck": 0.3}, "importance": "l3"}}, "unknown importance 'l3'"),
        ({"constraints": [{"metric": "gflops", "max": 1, "min": 0}]}, "exactly one of max or min"),
        ({"constraints": [{"metric": "latency", "max": 1}]}, "unknown metric 'latency'"),
        ({"engine": {"sampler": "cmaess"}}, "engine.sampler"),
        ({"budget": {"trials": None}}, "budget.trials, budget.timeout_s or both"),
        ({"imgsz": 300}, "multiple of 32"),
        ({"name": "bad name!"}, "name"),
        ({"finetune": {"overrides": {"distill_model": "t.pt"}}}, "use finetune.distill"),
        ({"finetune": {"distill": 6.0, "epochs": 0}}, "finetune.distill needs finetune.epochs >= 1"),
        ({"finetune": {"long": {"dis": 2.0}}}, "finetune.long sets dis: use finetune.distill"),
        ({"finetune": {"overrides": {"epochs": 9}}}, "finetune.overrides sets epochs"),
        ({"finetune": {"distill": -1}}, "finetune.distill"),
        ({"targets": [{"name": "t", "backend": "torch", "precision": "int8"}]}, "the torch backend has no int8"),
        ({"targets": [{"name": "t", "precision": "fp16"}]}, "fp16 is timed on CUDA only"),
        ({"targets": [{"name": "t", "precision": "int4"}]}, "targets.0.precision"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, patch, message):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, {**MINIMAL, **patch}))
    assert message in str(e.value) and "exp.yaml" in str(e.value)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "broken.yaml").write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_overrides_merge_into_sections(tmp_path):
    cfg = load_config(_write(tmp_path, MINIMAL), {"budget": {"trials": 3}, "storage": "sqlite:////tmp/x.db"})
    assert isinstance(cfg, ExperimentConfig) and cfg.budget.trials == 3 and cfg.storage == "sqlite:////tmp/x.db"


def test_the_long_fine_tune_recipe_applies_over_the_proxy_overrides():
    """finetune.long (the export's recipe) goes over finetune.overrides; mosaic closes for the last quarter unless
    the long recipe says otherwise; the proxy's own recipe is untouched."""
    from yoloprune.config import LONG_FINETUNE, FinetuneConfig

    cfg = FinetuneConfig(epochs=2, overrides={"seed": 3, "lr0": 0.001, "mosaic": 0.5})
    long = cfg.for_long(30)
    assert long.epochs == 30 and not long.skip_infeasible
    assert long.overrides == {"seed": 3, "lr0": LONG_FINETUNE["lr0"], "mosaic": 0.5, "close_mosaic": 7,
                              "warmup_epochs": 1, "cos_lr": True}  # fmt: skip
    assert cfg.overrides == {"seed": 3, "lr0": 0.001, "mosaic": 0.5} and cfg.epochs == 2
    assert FinetuneConfig(long={"close_mosaic": 0, "lr0": 0.01}).for_long(3).overrides == {
        "close_mosaic": 0,
        "lr0": 0.01,
    }
    assert FinetuneConfig(long={}).for_long(3).overrides == {"close_mosaic": 1}  # the proxy's recipe, mosaic once


def test_engine_keys_of_earlier_versions_are_read_into_their_sections():
    from yoloprune.config import config_from_dict

    raw = {
        "name": "legacy", "model": "yolov8n.yaml", "data": "d.yaml", "space": {"ratios": {"neck": 0.3}},
        "engine": {"nni_tuner": "random", "trial_concurrency": 2, "heartbeat_s": 3, "grace_s": 9, "max_retries": 1},
    }  # fmt: skip
    engine = config_from_dict(raw).engine
    assert (engine.nni.tuner, engine.nni.trial_concurrency) == ("random", 2)
    assert (engine.workers.heartbeat_s, engine.workers.grace_s, engine.workers.max_retries) == (3, 9, 1)
    with pytest.raises(ConfigError, match=r"engine.workers: grace_s \(3\) must exceed heartbeat_s \(3\)"):
        config_from_dict({**raw, "engine": {"workers": {"heartbeat_s": 3, "grace_s": 3}}})
