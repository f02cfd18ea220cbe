"""
The master's statistics (``--workers`` with ``--metrics-listen``): every
worker serves its own ``/stats`` on a private UNIX socket; the master's
``/metrics`` and ``/stats`` ask every worker at each scrape and sum the
samples with the same name and labels.  Every Octoplex metric is a counter,
a histogram or an in-flight gauge, so the sum is the daemon's total.

A worker that does not answer (one just restarting) is left out of that
scrape; ``octoplex_workers_scraped`` says how many answered.  Its counters
and histograms are not: what a worker last reported stays in the sums while
it does not answer, and what a worker counted before it died is carried
into every later sum (:class:`Carried`), so that a total never drops when
a worker restarts (``rate()`` would read the drop as a counter reset, and
every rate would spike).  Its gauges (in-flight counts, memory) go with it.

The master adds its own registry: its ``octoplex_worker_restarts_total``,
and its ``process_*`` statistics, summed with the workers' (resident
memory, CPU time and open files add up over the daemon's processes), but
for the facts of one process that do not add up (:data:`MASTER_ONLY`):
there the master's stands for the daemon's, so ``process_start_time_seconds``
changes when the daemon restarts, not when a worker does.
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar

import attr
from klein import Klein
from prometheus_client import CollectorRegistry
from twisted.internet.defer import DeferredList
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.iweb import IRequest
from twisted.web.server import Site

from octoplex.metrics import TEXT_CONTENT_TYPE, registry_stats
from octoplex.wire import JSON_CONTENT_TYPE

__all__ = [
    "MASTER_ONLY",
    "Carried",
    "TotalsSite",
    "master_totals",
    "render_totals_text",
    "sum_stats",
]

#: Seconds a worker has to answer a scrape.
SCRAPE_TIMEOUT = 2.0


def sum_stats(documents: list[dict[str, Any]]) -> dict[str, Any]:
    """
    The ``/stats`` documents of the workers, their samples summed by name
    and labels, in the same form.
    """
    total: dict[str, Any] = {}
    for document in documents:
        for family, entry in document.items():
            into = total.setdefault(
                family, {"type": entry["type"], "help": entry["help"], "samples": []}
            )
            index = {(s["name"], tuple(sorted(s["labels"].items()))): s for s in into["samples"]}
            for sample in entry["samples"]:
                key = (sample["name"], tuple(sorted(sample["labels"].items())))
                found = index.get(key)
                if found is None:
                    found = index[key] = {
                        "name": sample["name"],
                        "labels": dict(sample["labels"]),
                        "value": 0,
                    }
                    into["samples"].append(found)
                if sample["value"] is not None and found["value"] is not None:
                    found["value"] += sample["value"]
    return total


#: The kinds of family whose samples only grow while a process lives.
MONOTONIC = frozenset({"counter", "histogram"})


def monotonic_part(document: dict[str, Any]) -> dict[str, Any]:
    """
    The counters and histograms of a ``/stats`` document.
    """
    return {family: entry for family, entry in document.items() if entry["type"] in MONOTONIC}


def _start_time(document: dict[str, Any]) -> Any:
    entry = document.get("process_start_time_seconds")
    return entry["samples"][0]["value"] if entry and entry["samples"] else None


def _dropped(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """
    Whether a counter or histogram sample of ``after`` is below its value in
    ``before``: a new process in the place of the old.
    """
    for family, entry in before.items():
        now = {
            (s["name"], tuple(sorted(s["labels"].items()))): s["value"]
            for s in after.get(family, {}).get("samples", ())
        }
        for sample in entry["samples"]:
            value = now.get((sample["name"], tuple(sorted(sample["labels"].items()))))
            if value is not None and sample["value"] is not None and value < sample["value"]:
                return True
    return False


@attr.s(auto_attribs=True)
class Carried:
    """
    What each worker counted, kept so that the master's sums of counters
    and histograms never drop: a worker that does not answer a scrape
    counts as what it last reported, and one that died (a new process
    answers from its socket: another start time, or a count gone down) has
    its last counts added to every later sum.  Bounded by the workers'
    families and label sets, whatever the number of restarts.
    """

    #: Per worker socket: the start time and the counters it last reported.
    _last: dict[str, tuple[Any, dict[str, Any]]] = attr.Factory(dict)
    #: The summed last counters of the worker processes that ended.
    _ended: dict[str, Any] = attr.Factory(dict)

    def documents(self, answers: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
        """
        The documents to sum for one scrape, given each socket's answer
        (None: no answer).
        """
        documents = []
        for path, document in answers.items():
            last = self._last.get(path)
            if document is None:
                if last is not None:
                    documents.append(last[1])
                continue
            started, counts = _start_time(document), monotonic_part(document)
            if last is not None and (started != last[0] or _dropped(last[1], counts)):
                self._ended = sum_stats([self._ended, last[1]])
            self._last[path] = (started, counts)
            documents.append(document)
        if self._ended:
            documents.append(self._ended)
        return documents


#: The process statistics whose sum over processes means nothing: the
#: master's own are served instead.
MASTER_ONLY = ("process_start_time_seconds", "process_max_fds")


def master_totals(workers: list[dict[str, Any]], master: dict[str, Any]) -> dict[str, Any]:
    """
    The master's statistics: the workers' ``/stats`` documents and the
    master's own summed, but for the families of :data:`MASTER_ONLY`,
    which are the master's alone.
    """
    total = sum_stats([*workers, master])
    for family in MASTER_ONLY:
        total.pop(family, None)
        if family in master:
            total[family] = master[family]
    return total


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _value(value: Any) -> str:
    if value is None:
        return "NaN"
    if isinstance(value, str):
        return value
    return repr(float(value)) if not math.isinf(value) else ("+Inf" if value > 0 else "-Inf")


def render_totals_text(document: dict[str, Any]) -> bytes:
    """
    A ``/stats`` document in Prometheus' text exposition format.
    """
    lines = []
    for family, entry in sorted(document.items()):
        kind = entry["type"] if entry["type"] in ("counter", "gauge", "histogram") else "untyped"
        # As prometheus_client writes a counter: its name with _total.
        shown = f"{family}_total" if kind == "counter" else family
        lines.append(f"# HELP {shown} {_escape_help(entry['help'])}")
        lines.append(f"# TYPE {shown} {kind}")
        for sample in entry["samples"]:
            labels = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sample["labels"].items())
            name = sample["name"] + (f"{{{labels}}}" if labels else "")
            lines.append(f"{name} {_value(sample['value'])}")
    return ("\n".join(lines) + "\n").encode("utf-8")


class _Socket:
    def __init__(self, reactor: Any, path: str) -> None:
        self._reactor, self._path = reactor, path

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(self._reactor, self._path, timeout=SCRAPE_TIMEOUT)


@attr.s(auto_attribs=True)
class TotalsApp:
    """
    ``/metrics`` and ``/stats`` of the master: the workers' sums.

    :ivar sockets: the paths of the workers' statistics sockets.
    :ivar own: the master's own registry (see :func:`master_totals`).
    """

    router: ClassVar[Klein] = Klein()
    reactor: Any
    sockets: list[str]
    own: CollectorRegistry = attr.Factory(CollectorRegistry)
    carried: Carried = attr.Factory(Carried)

    async def _scrape(self) -> dict[str, Any]:
        pool = HTTPConnectionPool(self.reactor, persistent=False)

        async def one(path: str) -> dict[str, Any]:
            agent = Agent.usingEndpointFactory(self.reactor, _Socket(self.reactor, path), pool)
            d = agent.request(b"GET", b"http://worker/stats")
            d.addTimeout(SCRAPE_TIMEOUT, self.reactor)
            response = await d
            body = await readBody(response)
            document: dict[str, Any] = json.loads(body)
            return document

        from twisted.internet.defer import Deferred

        results = await DeferredList(
            [Deferred.fromCoroutine(one(path)) for path in self.sockets], consumeErrors=True
        )
        answers = {
            path: value if ok else None
            for path, (ok, value) in zip(self.sockets, results, strict=True)
        }
        scraped = sum(1 for answer in answers.values() if answer is not None)
        total = master_totals(self.carried.documents(answers), registry_stats(self.own))
        total["octoplex_workers_scraped"] = {
            "type": "gauge",
            "help": "Workers whose statistics this scrape summed.",
            "samples": [{"name": "octoplex_workers_scraped", "labels": {}, "value": scraped}],
        }
        return total

    @router.route("/metrics", methods=["GET"])
    async def prometheus(self, request: IRequest) -> bytes:
        """
        The workers' summed statistics in Prometheus' text format.
        """
        body = render_totals_text(await self._scrape())
        request.setHeader(b"content-type", TEXT_CONTENT_TYPE)
        return body

    @router.route("/stats", methods=["GET"])
    async def stats(self, request: IRequest) -> bytes:
        """
        The workers' summed statistics as a JSON document.
        """
        document = await self._scrape()
        request.setHeader(b"content-type", JSON_CONTENT_TYPE)
        return json.dumps(document, sort_keys=True, indent=1).encode("utf-8") + b"\n"


class TotalsSite(Site):
    """
    The master's statistics listener: quiet, with no access log.
    """

    noisy = False
    displayTracebacks = False

    def __init__(
        self, reactor: Any, sockets: list[str], own: CollectorRegistry | None = None
    ) -> None:
        app = TotalsApp(reactor, sockets, CollectorRegistry() if own is None else own)
        super().__init__(app.router.resource(), reactor=reactor)
