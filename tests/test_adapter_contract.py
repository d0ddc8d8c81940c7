"""The Ultralytics and Torch-Pruning internals yoloprune's adapter relies on. When an upgrade moves one of
these, this file fails first and names what moved, instead of a trial failing deep inside a search."""

from __future__ import annotations

import inspect

import torch_pruning as tp
import ultralytics.utils as uu
import ultralytics.utils.checks as uc
import ultralytics.utils.torch_utils as ut
from ultralytics.engine.trainer import BaseTrainer
from ultralytics.models.yolo.detect import DetectionTrainer, DetectionValidator
from ultralytics.nn.modules import C2f, C3k2

import yoloprune.ultra  # noqa: F401  (switches Ultralytics offline before the imports below)


def test_offline_switches_exist():
    for module, name in [
        (uu, "ONLINE"),
        (uc, "ONLINE"),
        (uc, "AUTOINSTALL"),
        (ut, "NUM_THREADS"),
        (uu, "USER_CONFIG_DIR"),
        (uu, "SETTINGS"),
    ]:
        assert hasattr(module, name), f"{module.__name__}.{name} is gone"
    assert uu.ONLINE is False and uc.AUTOINSTALL is False
    assert uu.SETTINGS["sync"] is False
    assert (uu.USER_CONFIG_DIR / "Arial.ttf").exists() and (uu.USER_CONFIG_DIR / "Arial.Unicode.ttf").exists()
    assert "check_font" in dir(uc)


def test_c2f_still_chunks_and_keeps_its_attributes():
    src = inspect.getsource(C2f.forward)
    assert ".chunk(2, 1)" in src, "C2f.forward changed; revisit yoloprune.ultra.blocks.SplitC2f"
    block = C2f(16, 16, n=1)
    assert {"cv1", "cv2", "m", "c"} <= set(vars(block)["_modules"]) | set(vars(block))
    assert issubclass(C3k2, C2f)


def test_trainer_uses_a_module_it_is_given():
    src = inspect.getsource(BaseTrainer.setup_model)
    assert "isinstance(self.model, torch.nn.Module)" in src, "setup_model no longer keeps a preset module"
    assert "cfg" in inspect.signature(DetectionTrainer.get_model).parameters
    assert "on_fit_epoch_end" in inspect.getsource(BaseTrainer)


def test_distillation_wraps_after_setup_model_and_strips_to_the_student():
    """finetune(distill=...) relies on Ultralytics wrapping the trainer's model (ours) in DistillationModel
    after setup_model, on the wrapper's student_model/projector, and on strip_optimizer keeping the student."""
    from ultralytics.nn.distill_model import DistillationModel

    setup = inspect.getsource(BaseTrainer._setup_train)
    assert setup.index("self.setup_model()") < setup.index("DistillationModel(student_model=self.model"), (
        "Ultralytics no longer wraps the model for distillation after setup_model; revisit yoloprune.ultra.train"
    )
    params = inspect.signature(DistillationModel.__init__).parameters
    assert {"teacher_model", "student_model"} <= set(params)
    assert "self.projector" in inspect.getsource(DistillationModel.__init__)
    assert ".student_model" in inspect.getsource(ut.strip_optimizer)


def test_validator_and_metrics_api():
    params = inspect.signature(DetectionValidator.__init__).parameters
    assert "args" in params
    from ultralytics.utils.metrics import DetMetrics

    for name in ("ap_class_index", "nt_per_class", "box"):
        assert name in inspect.getsource(DetMetrics), f"DetMetrics.{name} is gone"


def test_torch_pruning_api():
    params = inspect.signature(tp.pruner.BasePruner.__init__).parameters
    for name in ("pruning_ratio", "pruning_ratio_dict", "ignored_layers", "round_to", "output_transform"):
        assert name in params, f"BasePruner lost {name}"
    for name in ("GroupMagnitudeImportance", "BNScaleImportance", "RandomImportance"):
        assert hasattr(tp.importance, name)


# --- Optuna (yoloprune/storage/optuna_adapter.py) -------------------------------------------------------


def test_optuna_internals_the_adapter_uses():
    import optuna
    from optuna.storages import RDBStorage
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.study._constrained_optimization import _CONSTRAINTS_KEY

    assert callable(_create_scoped_session), "optuna.storages._rdb.storage._create_scoped_session is gone"
    assert hasattr(RDBStorage, "_set_trial_attr_without_commit"), "RDBStorage._set_trial_attr_without_commit is gone"
    assert hasattr(models, "TrialUserAttributeModel") and hasattr(models, "TrialSystemAttributeModel")
    assert isinstance(_CONSTRAINTS_KEY, str)
    study = optuna.create_study(storage="sqlite:///:memory:")
    assert hasattr(study, "_storage") and hasattr(study, "_study_id")
    assert hasattr(study._storage, "_backend"), "Optuna no longer wraps RDB storages in _CachedStorage"
    trial = study.ask()
    assert isinstance(trial._trial_id, int)


def test_every_retried_storage_call_exists_on_rdb_storage():
    from optuna.storages import RDBStorage

    from yoloprune.storage.optuna_storage import RetryingRDBStorage

    retried = [
        n
        for n, v in vars(RetryingRDBStorage).items()
        if callable(v) and n not in ("set_trial_attrs", "note_on_finished_trial")
    ]
    assert len(retried) >= 26
    for name in retried:
        assert callable(getattr(RDBStorage, name, None)), f"RDBStorage.{name} is gone"
    # Every public storage method Optuna's study and trials call is retried (a new one must be added).
    public = {n for n, v in vars(RDBStorage).items() if callable(v) and not n.startswith("_")}
    public -= {"upgrade", "get_current_version", "get_head_version", "get_all_versions", "remove_session",
               "get_heartbeat_interval", "get_heartbeat_stale_trial_callback", "check_trial_is_updatable",
               "delete_study", "get_n_trials", "get_trial_params", "get_trial_user_attrs", "get_trial_system_attrs",
               "get_trial_number_from_id", "get_trial_param"} | set(retried)  # fmt: skip
    assert public == set(), f"RDBStorage methods not retried by RetryingRDBStorage: {sorted(public)}"


def test_every_storage_call_of_optunas_cache_is_retried():
    """Optuna's cache calls some private methods of the RDB storage directly (creating a trial, reading trials):
    each must be retried by RetryingRDBStorage too, and the public ones that only delegate to them must not retry
    again (a retry around a retry multiplies the wait)."""
    import re

    from optuna.storages import RDBStorage
    from optuna.storages._cached_storage import _CachedStorage

    from yoloprune.storage.optuna_storage import RetryingRDBStorage

    called = set(re.findall(r"self\._backend\.(_[a-z_]+)\(", inspect.getsource(_CachedStorage)))
    assert {"_create_new_trial", "_get_trials"} <= called, "Optuna's cache no longer calls what it did"
    assert called <= set(vars(RetryingRDBStorage)), f"not retried: {sorted(called - set(vars(RetryingRDBStorage)))}"
    for public, private in [("create_new_trial", "_create_new_trial"), ("set_trial_param", "_set_trial_param"),
                            ("get_all_trials", "_get_trials"), ("get_best_trial", "_get_best_trial_id")]:  # fmt: skip
        assert f"self.{private}(" in inspect.getsource(getattr(RDBStorage, public)), (
            f"{public} no longer calls {private}"
        )
        assert not hasattr(vars(RetryingRDBStorage)[public], "__wrapped__"), f"{public} is retried twice"


def test_trial_creation_internals_the_idempotent_retry_uses():
    """RetryingRDBStorage._create_new_trial keys each new trial: it relies on Optuna creating it from a template
    through _get_prepared_new_trial, in the transaction that locks the study, and retrying inside."""
    from optuna.storages import RDBStorage

    source = inspect.getsource(RDBStorage._create_new_trial)
    assert "for_update=True" in source and "self._get_prepared_new_trial(study_id, template_trial, session)" in source
    assert list(inspect.signature(RDBStorage._get_prepared_new_trial).parameters) == [
        "self", "study_id", "template_trial", "session",
    ]  # fmt: skip
    prepared = inspect.getsource(RDBStorage._get_prepared_new_trial)
    assert (
        "template_trial.system_attrs.items()" in prepared and "datetime_start=template_trial.datetime_start" in prepared
    )


def test_batched_constraints_match_what_set_constraint_writes(tmp_path):
    import optuna

    from yoloprune.storage.optuna_adapter import rdb_storage, write_record
    from yoloprune.storage.record import TrialRecord

    reference = optuna.create_study()
    trial = reference.ask()
    trial.set_constraint("c0", -0.5)
    trial.set_constraint("c1", 0.25)
    study = optuna.create_study(storage=rdb_storage(f"sqlite:///{tmp_path / 's.db'}"))
    batched = study.ask()
    write_record(batched, TrialRecord(reward=1.0), [-0.5, 0.25])
    stored = study._storage.get_trial(batched._trial_id)
    assert stored.system_attrs == reference._storage.get_trial(trial._trial_id).system_attrs
    assert stored.user_attrs == {"reward": 1.0, "constraints": [-0.5, 0.25]}


def test_optuna_dashboard_reads_constraints_only_in_the_list_form(tmp_path):
    """optuna-dashboard 0.21 reads a trial's constraints from the ``constraints`` list, not Optuna 5's named keys:
    what ``DashboardStorage`` converts for it. When this fails, the dashboard changed: drop or adapt the view."""
    import optuna
    import pytest

    serializer = pytest.importorskip("optuna_dashboard._serializer", reason="the dashboard extra is not installed")
    from yoloprune.storage.optuna_adapter import dashboard_storage, rdb_storage, write_record
    from yoloprune.storage.record import TrialRecord

    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="s", storage=rdb_storage(url))
    write_record(study.ask(), TrialRecord(reward=1.0), [-0.5, 0.25])
    plain, view = rdb_storage(url), dashboard_storage(url)
    study_id = plain.get_study_id_from_name("s")
    assert serializer.serialize_frozen_trial(study_id, plain.get_all_trials(study_id)[0], {})["constraints"] == []
    viewed = view.get_all_trials(study_id)[0]
    assert serializer.serialize_frozen_trial(study_id, viewed, {})["constraints"] == [-0.5, 0.25]
