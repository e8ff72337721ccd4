"""Every use of Ray's private modules, in one place, each with the reason no public API serves.

Ray's private layout changes between minor versions: when upgrading Ray, this is the file to check.
"""

from __future__ import annotations

import json


def train_report_logger_name() -> str:
    """The logger that echoes every `ray.train.report` as a line of metrics. It is named after its file
    (`logging.getLogger(__file__)`), so only its module path can name it; there is no setting for it."""
    from ray.train.v2._internal.execution import context

    return context.__file__


def autoscaler_max_resources() -> dict[str, float] | None:
    """What an autoscaler v2 cluster can grow to (the sum over its node types' max counts), or None.
    `ray.cluster_resources()` only reports the nodes running now; the limits are published nowhere public."""
    from ray._private.state import state

    return state.get_max_resources_from_cluster_config()


def autoscaler_v1_node_types() -> set[str]:
    """The node types a v1 autoscaler knows, read from the status it publishes in the GCS key-value store
    (what `ray status` prints; no public API returns it). Every cluster runs one: without an autoscaling config
    (`ray start` alone, `ray.init()`) its read-only provider's only "node types" are the running nodes, `node_<id>`."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    report = (json.loads(status).get("autoscaler_report") or {}) if status else {}
    return {*(report.get("active_nodes") or {}), *(report.get("node_type_mapping") or {}).values()}
