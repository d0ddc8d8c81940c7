"""The Python facade: ``yoloprune.load_detector`` and ``yoloprune.prune`` take an ``ultralytics.YOLO``, a path or a
module; ``yoloprune.search`` runs a search and its result gives the front, the best trial, the report and the export."""

from __future__ import annotations

import pytest
from ultralytics import YOLO

import yoloprune
from tests.test_search_e2e import _config
from yoloprune.errors import ConfigError, ModelError
from yoloprune.pruning import count_params
from yoloprune.ultra.checkpoint import save_checkpoint
from yoloprune.ultra.models import DetectionModel


@pytest.fixture(scope="module")
def yolo() -> YOLO:
    return YOLO("yolov8n.yaml")  # builds from Ultralytics' own YAML: no download


def test_load_detector_takes_a_yolo_object_a_path_and_a_module(yolo, tmp_path):
    assert yoloprune.load_detector(yolo) is yolo.model  # its DetectionModel, not the wrapper
    assert yoloprune.load_detector(yolo.model) is yolo.model
    assert isinstance(yoloprune.load_detector("yolov8n.yaml"), DetectionModel)
    path = save_checkpoint(yolo.model, tmp_path / "n.pt")
    for source in (path, str(path), YOLO(str(path))):
        assert count_params(yoloprune.load_detector(source)) == count_params(yolo.model)


def test_a_classification_yolo_is_refused_with_its_task():
    with pytest.raises(ModelError, match=r"holds a 'classify' model .*detection models only"):
        yoloprune.load_detector(YOLO("yolov8n-cls.yaml"))


def test_prune_takes_a_yolo_object_a_path_and_a_module_and_leaves_it_whole(yolo, tmp_path):
    before = count_params(yolo.model)
    pruned = yoloprune.prune(yolo, {"backbone.p4": 0.3, "neck": 0.5})
    assert isinstance(pruned, DetectionModel) and count_params(pruned) < before
    assert count_params(yolo.model) == before  # the YOLO object's model is not modified
    from_module = yoloprune.prune(yolo.model, {"backbone.p4": 0.3, "neck": 0.5})
    assert count_params(from_module) == count_params(pruned)
    uniform = yoloprune.prune(save_checkpoint(yolo.model, tmp_path / "n.pt"), 0.3)  # one ratio on every stage
    assert count_params(uniform) < before


def test_search_is_the_package_too_and_overrides_reach_the_config(tmp_path, tiny_data):
    import yoloprune.search.results as results  # the package's modules still import as modules

    assert callable(yoloprune.search) and results.__name__ == "yoloprune.search.results"
    from yoloprune.api import _config as facade_config

    path = _config(tmp_path, tiny_data, "ov")
    cfg = facade_config(path, {"budget": {"trials": 7}, "finetune.epochs": 2, "engine": {"seed": 3}})
    assert (cfg.budget.trials, cfg.finetune.epochs, cfg.finetune.batch, cfg.engine.seed) == (7, 2, 8, 3)
    with pytest.raises(ConfigError, match="apply to a config file"):
        facade_config(cfg, {"budget": {"trials": 1}})


@pytest.mark.slow
def test_search_returns_the_front_the_best_trial_the_report_and_the_export(tmp_path, tiny_data):
    path = _config(tmp_path, tiny_data, "facade", targets=[], constraints=[],
                   objectives=[{"metric": "map50_95", "direction": "maximize"},
                               {"metric": "gflops", "direction": "minimize"}])  # fmt: skip
    result = yoloprune.search(path, progress=False, budget={"trials": 2}, **{"finetune.epochs": 0})
    assert len(result.trials) == 2 and (result.trials["state"] == "complete").all()
    front = result.front
    assert len(front) >= 1 and {"map50_95", "gflops", "reward"} <= set(front.columns)
    best = result.best
    assert best.number in set(front["trial"]) and best.metrics["gflops"] == front["gflops"].min()
    assert set(best.ratios) == {"backbone.p4", "neck"}
    assert yoloprune.SearchResult.load(path).best.number == best.number  # read back from storage

    report = result.report()
    assert report.path == result.config.output_dir / "report.html" and "<html" in report.path.read_text()[:500]
    assert report.csv.exists()

    shipped = result.export(epochs=1, output=tmp_path / "export")
    assert shipped.card["trial"] == best.number and shipped.checkpoint.exists() and shipped.onnx.exists()
    assert count_params(yoloprune.load_detector(shipped.checkpoint)) == best.record.metrics["params"]
