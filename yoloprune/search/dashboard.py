"""Follow a search in optuna-dashboard: the experiment's study on its own storage, with the objectives named after
the config's metrics and a study note listing the objectives and the constraints.

optuna-dashboard names no constraint: it draws trials with any violation above zero as infeasible (grey), and
shows each trial's user attributes, where the record keeps its ``constraints`` and ``feasible``. The note says
which metric each constraint ``cN`` bounds.
"""

from __future__ import annotations

from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna

from yoloprune.config import ExperimentConfig
from yoloprune.errors import BackendUnavailableError, ConfigError
from yoloprune.log import get_logger
from yoloprune.storage.optuna_adapter import dashboard_storage, load_study

LOGGER = get_logger(__name__)

#: The first line of the note yoloprune writes; a note that does not start with it is the user's and is kept.
NOTE_TITLE = "## yoloprune experiment"


def note_text(config: ExperimentConfig) -> str:
    """The study note (Markdown): the objectives, in the order of a trial's values, and the constraints by name."""
    lines = [
        f"{NOTE_TITLE} `{config.name}`",
        "",
        "| objective | metric | direction |",
        "|---|---|---|",
        *(f"| {i} | `{o.metric}` | {o.direction} |" for i, o in enumerate(config.objectives)),
        "",
    ]
    if config.constraints:
        lines += [
            "Constraints (a trial's violation: <= 0 satisfied; a trial violating any is drawn grey, infeasible):",
            "",
            "| constraint | bound |",
            "|---|---|",
            *(f"| c{i} | `{c.describe()}` |" for i, c in enumerate(config.constraints)),
            "",
        ]
    else:
        lines += ["No constraints: every complete trial is feasible.", ""]
    lines.append(
        "Each trial's metrics, candidate, timings and `constraints` are its user attributes. "
        "`yoloprune results` and `yoloprune report` read the same storage."
    )
    return "\n".join(lines)


def prepare_study(config: ExperimentConfig) -> optuna.Study:
    """The experiment's study (a clear error when there is none), its metrics named and its note written, unless the
    study already has a note of the user's own."""
    note = _dashboard()
    study = load_study(config, heartbeats=False)  # names the metrics of a study created before they were named
    current, wanted = note.get_note(study), note_text(config)
    if current != wanted and (not current or current.startswith(NOTE_TITLE)):
        note.save_note(study, wanted)
    return study


def bind(config: ExperimentConfig, *, host: str = "127.0.0.1", port: int = 8081) -> tuple[WSGIServer, str]:
    """optuna-dashboard on the experiment's storage, listening on ``host:port`` (0: any free port) but not yet
    serving (call ``serve_forever()``); returns the server and the study's page."""
    dashboard = _dashboard()
    prepare_study(config)
    storage = dashboard_storage(config.storage_url)
    study_id = storage.get_study_id_from_name(config.name)
    try:
        server = make_server(host, port, dashboard.wsgi(storage), handler_class=_QuietHandler)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port.") from None
    return server, f"http://{host}:{server.server_port}/dashboard/studies/{study_id}"


class _QuietHandler(WSGIRequestHandler):
    """Requests go to the package's debug log, not one line each on stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        LOGGER.debug("dashboard: " + format, *args)


def _dashboard() -> Any:
    try:
        import optuna_dashboard
    except ImportError as e:
        raise BackendUnavailableError(
            f"the dashboard needs the 'dashboard' extra: pip install -e '.[dashboard]' (optuna-dashboard). ({e})"
        ) from None
    return optuna_dashboard
