"""Running the shipped DAGs many times in one process with ``dag.test()``, quickly.

``dag.test()`` re-parses the whole DAGs folder and re-serializes every DAG into the metadata
database on each call (so sibling DAGs stay current, apache/airflow#64884). A simulation runs
the same unchanged DAG files thousands of times: it parses and syncs them once, then skips
the re-sync. The runs themselves (scheduling loop, task execution through the in-process
execution API, XComs, the tasks' code) are untouched.
"""

from __future__ import annotations

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
    return bag


def _sync_once(dagbag_module: Any) -> None:
    """From now on dag.test() finds every DAG already synced and skips the re-parse."""

    class _Synced:
        def __init__(self, **_: Any) -> None:
            pass

    dagbag_module.BundleDagBag = _Synced
    dagbag_module.sync_bag_to_db = lambda *args, **kwargs: None
