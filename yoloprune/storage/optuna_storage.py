"""Optuna's RDB storage, retried without writing anything twice (the half of the Optuna adapter that is storage).

:class:`RetryingRDBStorage` survives a database restart or a dropped connection: every call Optuna's study and
trials make is retried with backoff on transient errors, and a retried write is safe to repeat after a lost
acknowledgement (it committed; the client never learnt it). A new trial carries a key while it is created, so a
retry finds the trial its earlier attempt committed; several attributes of a trial are written in one
transaction (one round trip instead of one per attribute). With :mod:`.optuna_adapter`, the only module that
touches Optuna's internals (``tests/test_adapter_contract.py`` checks each one against the pinned Optuna).
"""

from __future__ import annotations

import copy
import functools
import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from yoloprune.log import get_logger
from yoloprune.storage.retry import retry_transient, retry_write

LOGGER = get_logger(__name__)

#: A system attribute a trial carries while it is being created: a key drawn once per call, by which a retry finds
#: the trial its earlier attempt committed before the acknowledgement was lost. Removed once the trial exists.
CREATE_KEY = "yoloprune:create_key"


class RetryingRDBStorage(RDBStorage):
    """RDBStorage whose calls are retried with backoff on transient database errors, with batched attribute
    writes. Each method Optuna's study and trials call is listed, so a new Optuna method is not retried
    until it is added here (the contract test lists the ones Optuna has).

    A retried write must be safe to repeat after a lost acknowledgement (it committed, the client never
    learnt it). Reads are. Of the writes: attributes, parameters, intermediate values and heartbeats are
    upserts on their key (a repeat sets the same value); :meth:`set_trial_attrs` and :meth:`note_on_finished_trial`
    too; a study whose creation is repeated raises DuplicatedStudyError, which :func:`create_study` answers by
    loading it. Trial creation and state changes are made safe below (:meth:`_create_new_trial`,
    :meth:`set_trial_state_values`).
    """

    @retry_transient
    def set_trial_attrs(self, trial_id: int, user: dict[str, Any], system: dict[str, Any]) -> None:
        """Set several user and system attributes of a trial in one transaction."""
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(self.scoped_session, True) as session:
            for key, value in user.items():
                self._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial_id, key, value)
            for key, value in system.items():
                self._set_trial_attr_without_commit(session, models.TrialSystemAttributeModel, trial_id, key, value)

    @retry_transient
    def note_on_finished_trial(self, trial_id: int, key: str, value: Any) -> None:
        """Set a user attribute of a trial that is already finished (Optuna forbids it through its API)."""
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(self.scoped_session, True) as session:
            session.query(models.TrialUserAttributeModel).filter_by(trial_id=trial_id, key=key).delete()
            session.add(models.TrialUserAttributeModel(trial_id=trial_id, key=key, value_json=json.dumps(value)))

    # Optuna's own calls, each retried.
    @retry_transient
    def create_new_study(self, *args: Any, **kwargs: Any) -> Any:
        return super().create_new_study(*args, **kwargs)

    @retry_transient
    def get_study_id_from_name(self, *args: Any, **kwargs: Any) -> Any:
        return super().get_study_id_from_name(*args, **kwargs)

    @retry_transient
    def get_study_name_from_id(self, *args: Any, **kwargs: Any) -> Any:
        return super().get_study_name_from_id(*args, **kwargs)

    @retry_transient
    def get_study_directions(self, *args: Any, **kwargs: Any) -> Any:
        return super().get_study_directions(*args, **kwargs)

    @retry_transient
    def get_study_user_attrs(self, *args: Any, **kwargs: Any) -> Any:
        return super().get_study_user_attrs(*args, **kwargs)

    @retry_transient
    def get_study_system_attrs(self, *args: Any, **kwargs: Any) -> Any:
        return super().get_study_system_attrs(*args, **kwargs)

    @retry_transient
    def set_study_user_attr(self, *args: Any, **kwargs: Any) -> Any:
        return super().set_study_user_attr(*args, **kwargs)

    @retry_transient
    def set_study_system_attr(self, *args: Any, **kwargs: Any) -> Any:
        return super().set_study_system_attr(*args, **kwargs)

    @retry_transient
    def get_all_studies(self, *args: Any, **kwargs: Any) -> Any:
        return super().get_all_studies(*args, **kwargs)

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        """Not retried itself: it calls :meth:`_create_new_trial`, which retries without duplicating."""
        return super().create_new_trial(study_id, template_trial)

    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        """Optuna's (what its cache calls), retried without ever adding a trial twice.

        The trial is created with :data:`CREATE_KEY`, a key drawn once per call, and every attempt (Optuna's own
        retries inside, ours outside) first looks for a trial with that key (:meth:`_get_prepared_new_trial`):
        check-then-insert in the attempt's transaction, under Optuna's lock on the study row. Once the trial
        exists, the key is removed (the trial's attributes are as Optuna alone would write them).
        """
        keyed = _keyed_template(template_trial, uuid.uuid4().hex)
        frozen: FrozenTrial = retry_transient(super()._create_new_trial)(study_id, keyed)
        try:
            retry_transient(_drop_create_key)(self, frozen._trial_id)
        except Exception as e:  # the trial exists and runs; the key left on it is only untidy
            LOGGER.warning("trial %d keeps its creation key %s (%s)", frozen.number, CREATE_KEY, str(e)[:200])
        frozen.system_attrs = {k: v for k, v in frozen.system_attrs.items() if k != CREATE_KEY}
        return frozen

    def _get_prepared_new_trial(self, study_id: int, template_trial: FrozenTrial | None, session: Any) -> Any:
        """Optuna's, but a trial an earlier attempt of the same call committed (found by its key) is returned
        instead of a second one."""
        key = None if template_trial is None else template_trial.system_attrs.get(CREATE_KEY)
        if key is not None and (found := _trial_created_with(session, study_id, key)) is not None:
            LOGGER.info("trial %d was created before the connection was lost; not created again", found.number)
            return found
        return super()._get_prepared_new_trial(study_id, template_trial, session)

    def set_trial_param(self, *args: Any, **kwargs: Any) -> Any:
        """Not retried itself: it calls ``_set_trial_param`` (an upsert), retried below."""
        return super().set_trial_param(*args, **kwargs)

    @retry_transient
    def _set_trial_param(self, *args: Any, **kwargs: Any) -> Any:
        return super()._set_trial_param(*args, **kwargs)

    @retry_transient
    def get_trial_id_from_study_id_trial_number(self, *args: Any, **kwargs: Any) -> Any:
        return super().get_trial_id_from_study_id_trial_number(*args, **kwargs)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        """Optuna's, retried. A repeat after a lost acknowledgement would find the trial finished and raise
        UpdateFinishedTrialError: so a trial found finished in ``state`` with ``values`` was finished by this call.

        A trial found RUNNING is not claimed (another worker may have popped the same WAITING trial): the pop
        returns False and the trial is failed as stale after the heartbeat grace period, then queued again.
        """
        write = functools.partial(super().set_trial_state_values, trial_id, state, values)
        read = super().get_trial

        def written() -> bool | None:
            if not state.is_finished():
                return None
            stored = read(trial_id)
            same = stored.state == state and (values is None or stored.values == list(values))
            return True if same else None

        return retry_write(write, written)

    @retry_transient
    def set_trial_intermediate_value(self, *args: Any, **kwargs: Any) -> Any:
        return super().set_trial_intermediate_value(*args, **kwargs)

    @retry_transient
    def set_trial_user_attr(self, *args: Any, **kwargs: Any) -> Any:
        return super().set_trial_user_attr(*args, **kwargs)

    @retry_transient
    def set_trial_system_attr(self, *args: Any, **kwargs: Any) -> Any:
        return super().set_trial_system_attr(*args, **kwargs)

    @retry_transient
    def get_trial(self, *args: Any, **kwargs: Any) -> Any:
        return super().get_trial(*args, **kwargs)

    def get_all_trials(self, *args: Any, **kwargs: Any) -> Any:
        """Not retried itself: it calls ``_get_trials`` (what Optuna's cache calls too), retried below."""
        return super().get_all_trials(*args, **kwargs)

    @retry_transient
    def _get_trials(self, *args: Any, **kwargs: Any) -> Any:
        return super()._get_trials(*args, **kwargs)

    def get_best_trial(self, *args: Any, **kwargs: Any) -> Any:
        """Not retried itself: each storage call it makes is."""
        return super().get_best_trial(*args, **kwargs)

    @retry_transient
    def _get_best_trial_id(self, *args: Any, **kwargs: Any) -> Any:
        return super()._get_best_trial_id(*args, **kwargs)

    @retry_transient
    def record_heartbeat(self, *args: Any, **kwargs: Any) -> Any:
        return super().record_heartbeat(*args, **kwargs)

    @retry_transient
    def _get_stale_trial_ids(self, *args: Any, **kwargs: Any) -> Any:
        return super()._get_stale_trial_ids(*args, **kwargs)


def _keyed_template(template: FrozenTrial | None, key: str) -> FrozenTrial:
    """``template`` (a plain running trial when None, as Optuna makes it) carrying :data:`CREATE_KEY` ``key``."""
    if template is None:
        return FrozenTrial(
            number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(), datetime_complete=None,
            params={}, distributions={}, user_attrs={}, system_attrs={CREATE_KEY: key}, intermediate_values={},
            trial_id=-1,
        )  # fmt: skip
    keyed = copy.copy(template)
    keyed.system_attrs = {**template.system_attrs, CREATE_KEY: key}
    return keyed


def _trial_created_with(session: Any, study_id: int, key: str) -> Any:
    """The trial of ``study_id`` created with :data:`CREATE_KEY` ``key`` (an Optuna TrialModel), or None."""
    from optuna.storages._rdb import models

    attr = models.TrialSystemAttributeModel
    return (
        session.query(models.TrialModel)
        .join(attr, attr.trial_id == models.TrialModel.trial_id)
        .filter(models.TrialModel.study_id == study_id, attr.key == CREATE_KEY, attr.value_json == json.dumps(key))
        .one_or_none()
    )


def _drop_create_key(storage: RDBStorage, trial_id: int) -> None:
    """Remove :data:`CREATE_KEY` from a created trial (safe to repeat: a delete)."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(storage.scoped_session, True) as session:
        session.query(models.TrialSystemAttributeModel).filter_by(trial_id=trial_id, key=CREATE_KEY).delete()
