"""The metrics endpoint's folded counters (exited workers' figures per slot) as JSON, across an upgrade's exec."""

from __future__ import annotations


def dump_bases(metrics) -> dict:
    """Each slot's counters of exited workers, and the backend families' type and help."""
    bases = {}
    for slot, fig in metrics.bases.items():
        bases[str(slot)] = {
            "dispatched": fig.dispatched, "returned": fig.returned, "resumed": fig.resumed, "duration_sum": fig.duration_sum, "cpu": fig.cpu,
            "events": fig.events, "buckets": fig.buckets,
            "requests": [[method, code, n] for (method, code), n in fig.requests.items()],
            "user": [[family, sample, [list(pair) for pair in labels], value]
                     for family, samples in fig.user.items() for (sample, labels), value in samples.items()],
        }
    return {"bases": bases, "families": {name: list(pair) for name, pair in metrics.families.items()}}


def load_bases(metrics, data: dict) -> None:
    """Put dump_bases()'s figures back into a new image's metrics endpoint."""
    from balancer.metrics import SlotFigures

    for slot, item in data.get("bases", {}).items():
        fig = SlotFigures()
        fig.dispatched, fig.duration_sum, fig.cpu = item["dispatched"], item["duration_sum"], item["cpu"]
        fig.returned, fig.resumed = item.get("returned", 0), item.get("resumed", 0)
        fig.events.update(item["events"])
        if len(item["buckets"]) == len(fig.buckets):
            fig.buckets = list(item["buckets"])
        fig.requests = {(method, code): n for method, code, n in item["requests"]}
        for family, sample, labels, value in item["user"]:
            fig.user.setdefault(family, {})[(sample, tuple(tuple(pair) for pair in labels))] = value
        metrics.bases[int(slot)] = fig
    metrics.families.update({name: tuple(pair) for name, pair in data.get("families", {}).items()})
