"""Salvo's Prometheus text from a server's HTTP port, read the way Prometheus reads it."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

GAUGES = ("salvo_queue_depth", "salvo_inflight")


def gauges(http_port: int, model: str, names: tuple[str, ...] = GAUGES) -> dict[str, float]:
    """The samples called `names` with label model=`model`, by name."""
    url = f"http://127.0.0.1:{http_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        families = text_string_to_metric_families(reply.read().decode())
    return {
        s.name: s.value
        for family in families
        for s in family.samples
        if s.name in names and s.labels.get("model") == model
    }
