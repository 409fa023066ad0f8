"""Running the shipped DAGs many times in one process with ``dag.test()``, quickly.

``dag.test()`` re-parses the whole DAGs folder and re-serializes every DAG into the metadata
database on each call (so sibling DAGs stay current, apache/airflow#64884). A simulation runs
the same unchanged DAG files thousands of times: it parses and syncs them once, then skips
the re-sync. Params are validated against their JSON schemas on every resolve (about 25 times
per task) by ``jsonschema.validate``, which re-checks the schema itself each time; the
simulation keeps one validator per schema, and gives each run the secrets masker a fresh task
process has. The runs themselves (scheduling loop, task execution through the in-process
execution API, XComs, the tasks' code, every Param check) are untouched. A person clearing
tasks of an ended run is Airflow's own clear, then the same loop over that run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


def load_dags(dags_folder: str | Path | None = None) -> Any:
    """The DagBag of the DAGs folder, synced to the metadata database once."""
    from airflow import settings
    from airflow.dag_processing import dagbag as dagbag_module
    from airflow.dag_processing.bundles.manager import DagBundlesManager

    folder = str(dags_folder or settings.DAGS_FOLDER)
    bag = dagbag_module.DagBag(folder)
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    manager = DagBundlesManager()
    manager.sync_bundles_to_db()
    for bundle in manager.get_all_dag_bundles():
        if not bundle.is_initialized:
            bundle.initialize()
        parsed = dagbag_module.BundleDagBag(
            dag_folder=bundle.path, bundle_path=bundle.path, bundle_name=bundle.name
        )
        dagbag_module.sync_bag_to_db(parsed, bundle.name, bundle.version)
    _sync_once(dagbag_module)
    _one_validator_per_schema()
    return bag


def _sync_once(dagbag_module: Any) -> None:
    """From now on dag.test() finds every DAG already synced and skips the re-parse."""

    class _Synced:
        def __init__(self, **_: Any) -> None:
            pass

    dagbag_module.BundleDagBag = _Synced
    dagbag_module.sync_bag_to_db = lambda *args, **kwargs: None


def _one_validator_per_schema() -> None:
    """``jsonschema.validate`` with the schema checked and its validator built once."""
    import jsonschema
    from jsonschema.exceptions import best_match
    from jsonschema.validators import validator_for

    validators: dict[tuple[str, Any], Any] = {}

    def validate(instance: Any, schema: Any, cls: Any = None, *args: Any, **kwargs: Any) -> None:
        key = (json.dumps(schema, sort_keys=True, default=repr), cls)
        validator = validators.get(key)
        if validator is None:
            klass = cls or validator_for(schema)
            klass.check_schema(schema)
            validator = validators[key] = klass(schema, *args, **kwargs)
        error = best_match(validator.iter_errors(instance))
        if error is not None:
            raise error

    jsonschema.validate = validate


class FreshSecretsMasker:
    """Each DAG run starts with the secrets masker a fresh task process would have.

    A real task runs in its own process, so the tokens it masks die with it. Here every run
    shares one process: without this, each run's token joins one growing regex that is
    recompiled on every new secret and run over every log line, and the year slows down by
    itself. Masking inside a run is untouched.
    """

    def __init__(self) -> None:
        from airflow._shared.secrets_masker import secrets_masker as core
        from airflow.sdk._shared.secrets_masker import secrets_masker as sdk

        self.maskers = [core._secrets_masker(), sdk._secrets_masker()]
        self.at_start = [set(m.patterns) for m in self.maskers]

    def restore(self) -> None:
        for masker, patterns in zip(self.maskers, self.at_start, strict=True):
            if masker.patterns != patterns:
                masker.patterns = set(patterns)
                masker.replacer = re.compile("|".join(patterns)) if patterns else None


def clear_and_run_again(dag: Any, run_id: str, tasks: list[tuple[str, int]]) -> Any:
    """What a person clearing failed tasks in the UI (without Downstream), then the
    scheduler, do to one run: Airflow's own clear of those task instances (the REST API's
    ``dag.clear`` then ``clear_task_instances``), then the loop ``dag.test()`` runs, over the
    same run, until it ends. Returns the run."""
    import time

    from airflow import settings
    from airflow.models.dagbag import DBDagBag
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import clear_task_instances
    from airflow.sdk import timezone
    from airflow.sdk.definitions.dag import _run_task
    from airflow.utils.state import DagRunState, TaskInstanceState
    from sqlalchemy import select

    session = settings.Session()  # the thread's scoped session, as dag.test() uses
    scheduler_dag = DBDagBag().get_latest_version_of_dag(dag.dag_id, session=session)
    cleared = scheduler_dag.clear(
        dry_run=True, task_ids=tasks, run_id=run_id, only_failed=True, session=session
    )
    clear_task_instances(cleared, session, DagRunState.QUEUED)
    session.commit()
    dag_run = session.scalar(
        select(DagRun).where(DagRun.dag_id == dag.dag_id, DagRun.run_id == run_id)
    )
    dag_run.dag = scheduler_dag
    dag_run.state = DagRunState.RUNNING  # the scheduler starts the queued run
    session.commit()
    while dag_run.state == DagRunState.RUNNING:
        session.expire_all()
        schedulable, _ = dag_run.update_state(session=session)
        for ti in schedulable:
            if ti.state != TaskInstanceState.UP_FOR_RESCHEDULE:
                ti.try_number += 1
            ti.state = TaskInstanceState.SCHEDULED
            ti.scheduled_dttm = timezone.utcnow()
        session.commit()
        scheduled = [
            ti
            for ti in dag_run.get_task_instances(session=session)
            if ti.state == TaskInstanceState.SCHEDULED
        ]
        if not scheduled:
            time.sleep(1)  # waiting on a retry delay, as dag.test() does
        for ti in scheduled:
            _run_task(ti=ti, task=dag.task_dict[ti.task_id])
    return dag_run
