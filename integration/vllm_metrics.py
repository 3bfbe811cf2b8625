"""kvbm_fs figures on vLLM's own ``/metrics``: the connector's ``KVConnectorPromMetrics``.

vLLM sums every worker's and the scheduler's ``KvbmFsStats`` for each step and hands the result to
``observe`` in the process that serves ``/metrics`` (the API server), so these counters are right in
vLLM's multiprocess mode without anything of kvbm_fs's own.  Names follow vLLM's (``vllm:`` prefix,
its ``model_name``/``engine`` labels): ``vllm:kvbm_fs_<counter>_total`` for each of ``COUNTERS`` and
``vllm:kvbm_fs_<load|save|match>_seconds_total`` for the timers.  The store's own ``kvbm_fs_*``
metrics (per tier) are served by the store itself (``metrics_port``), see docs/architecture.md.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics

from kvbm_fs.integration.vllm import COUNTERS, TIMERS

PREFIX = "vllm:kvbm_fs_"


def metric_name(key: str) -> str:
    """The vLLM metric (without ``_total``) for a KvbmFsStats key: ``load_s`` -> ``..._load_seconds``."""
    return PREFIX + (key[:-2] + "_seconds" if key in TIMERS else key)


class KvbmFsPromMetrics(KVConnectorPromMetrics):
    """One counter per KvbmFsStats key and engine, incremented by each interval's summed stats."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters: dict[int, dict[str, Any]] = {e: {} for e in per_engine_labelvalues}
        for key in (*COUNTERS, *TIMERS):
            doc = f"kvbm_fs connector: {key.replace('_', ' ')} (summed over workers and scheduler)"
            c = self._counter_cls(name=metric_name(key), documentation=doc, labelnames=labelnames)
            for engine, values in per_engine_labelvalues.items():
                self.counters[engine][key] = c.labels(*values)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        mine = self.counters.get(engine_idx)
        if mine is None:
            return
        for key, v in transfer_stats_data.items():
            c = mine.get(key)
            if c is not None and v and v > 0:
                c.inc(v)


__all__ = ["KvbmFsPromMetrics", "metric_name"]
