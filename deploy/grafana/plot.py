#!/usr/bin/env python3
"""
Draw the Grafana dashboard (deploy/grafana/octoplex.json) under load, without
Grafana: every panel's own expressions, evaluated by a real Prometheus that
scraped a real Octoplex, drawn with matplotlib in the dashboard's layout.

It starts, all on 127.0.0.1 and in a temporary directory:

- a local upstream (this script with ``--serve-upstream``, a Twisted server
  that answers the paths of tests/wiremock's stubs: ``/hello``, ``/slow``
  after 1 s, ``/unavailable`` with 503, and ``/fault/reset``,
  ``/fault/empty``, ``/fault/garbage`` broken);
- ``twistd octoplex`` with 2 workers and ``--metrics-listen`` (so the master
  sums its workers' statistics), and in-flight caps low enough for the
  bursts to reach them;
- Debian's ``prometheus`` (``apt-get install prometheus``), scraping the
  daemon every second, with deploy/prometheus/alerts.yml loaded;
- deploy/traffic.py for ``--seconds`` seconds: steady batches, and bursts
  from two other loopback addresses that get 429 and 503 answers;

and SIGKILLs one worker halfway, so that the restart shows.  Then it asks
Prometheus' ``/api/v1/query_range`` for each panel's expressions (``$job``
and ``$__rate_interval`` replaced as Grafana would) and saves the picture.
Every process it started is stopped at the end, whatever happens.

Needs matplotlib (``pip install matplotlib``: it is no dependency of
Octoplex) and the ``prometheus`` binary on the PATH.  From the repository
root:

    python deploy/grafana/plot.py --seconds 60 --out docs/images/dashboard.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "octoplex.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
TRAFFIC = ROOT / "deploy" / "traffic.py"

#: What the picture's Prometheus scrape interval makes of Grafana's variables.
SCRAPE_INTERVAL = 1
RATE_INTERVAL = "5s"
JOB = "octoplex"

#: Octoplex's caps in this run, low enough for the bursts to reach them.
CAPS = [
    "--max-batches-in-flight",
    "14",
    "--max-client-batches-in-flight",
    "6",
    # Per worker; small, so that the budget's line fits the memory panel.
    "--max-buffered-bytes",
    str(64 * 2**20),
]
#: deploy/traffic.py's load in this run (with --duration added).
LOAD = [
    "--rate",
    "12",
    "--concurrency",
    "6",
    "--burst-every",
    "20",
    "--burst-for",
    "8",
    "--burst-threads",
    "20",
    "--burst-size",
    "4",
    "--source",
    "127.0.0.2",
    "--source",
    "127.0.0.3",
]


# -- the upstream -----------------------------------------------------------


def serve_upstream(port: int) -> None:
    """
    Answer the paths of tests/wiremock's stubs on 127.0.0.1:``port`` until
    killed.
    """
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Site

    class Upstream(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> Any:
            path = request.path.decode()
            transport = request.channel.transport
            if path == "/hello":
                return b"Hello world!"
            if path == "/slow":
                call = reactor.callLater(1.0, self._late, request)

                def gone(_: Any) -> None:
                    if call.active():
                        call.cancel()

                request.notifyFinish().addErrback(gone)
                return NOT_DONE_YET
            if path == "/unavailable":
                request.setResponseCode(503)
                return b"Service Unavailable"
            if path == "/fault/reset":
                transport.abortConnection()
                return NOT_DONE_YET
            if path == "/fault/empty":
                transport.loseConnection()
                return NOT_DONE_YET
            if path == "/fault/garbage":
                transport.write(os.urandom(64))
                transport.loseConnection()
                return NOT_DONE_YET
            request.setResponseCode(404)
            return b"no such path"

        @staticmethod
        def _late(request: Any) -> None:
            request.write(b"slow")
            request.finish()

    site = Site(Upstream())
    site.log = lambda request: None  # type: ignore[method-assign]
    # Site is a ServerFactory at run time; its stubs say otherwise.
    reactor.listenTCP(port, site, interface="127.0.0.1", backlog=1024)  # type: ignore[arg-type]
    reactor.run()


# -- processes --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Any, timeout: float, process: subprocess.Popen[bytes]) -> None:
    """Call ``check()`` until it is true, at most ``timeout`` seconds; fail if ``process`` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what}: the process exited with {process.returncode}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"waited {timeout:g} s for {what}, in vain")


def get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process, last started first; SIGKILL what is left after 15 s."""
    for process in reversed(processes):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for process in reversed(processes):
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# -- Prometheus -------------------------------------------------------------


def expression(expr: str) -> str:
    """A panel's expression as Grafana sends it, its variables replaced."""
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace("$job", JOB)


def query_range(base: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode(
        {"query": expression(expr), "start": start, "end": end, "step": SCRAPE_INTERVAL}
    )
    document = json.loads(get(f"{base}/api/v1/query_range?{query}", timeout=30))
    if document.get("status") != "success":
        raise SystemExit(f"Prometheus refused {expr!r}: {document}")
    result: list[dict[str, Any]] = document["data"]["result"]
    return result


def legend(template: str, labels: dict[str, str]) -> str:
    text = template
    for name, value in labels.items():
        text = text.replace("{{" + name + "}}", value)
    return text


# -- drawing ----------------------------------------------------------------


def formatter(unit: str) -> Any:
    from matplotlib.ticker import FuncFormatter

    def fmt(value: float, _: Any) -> str:
        if unit in ("reqps", "ops"):
            return f"{value:g}/s"
        if unit == "s":
            if value >= 1:
                return f"{value:.1f} s"
            return f"{value * 1000:.2g} ms" if value < 0.01 else f"{value * 1000:.0f} ms"
        if unit == "percentunit":
            return f"{value * 100:.1f} %"
        if unit == "bytes":
            return f"{value / 2**20:.0f} MiB"
        if unit == "Bps":
            return f"{value / 2**10:.0f} KiB/s"
        return f"{value:g}"

    return FuncFormatter(fmt)


def draw(
    dashboard: dict[str, Any],
    results: dict[int, list[tuple[str, list[tuple[float, float]]]]],
    start: float,
    marks: list[tuple[float, str]],
    subtitle: str,
    out: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    figure = plt.figure(figsize=(16, rows * 0.36), facecolor="#111217")
    grid = GridSpec(rows, 24, figure=figure, hspace=2.4, wspace=1.2)
    grid.update(left=0.04, right=0.99, top=0.92, bottom=0.03)
    figure.suptitle(
        f"{dashboard['title']}: {subtitle}",
        color="#d8d9da",
        fontsize=9,
        x=0.01,
        y=0.995,
        ha="left",
        va="top",
    )
    colors = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#b877d9", "#37b8c2"]
    for panel in panels:
        g = panel["gridPos"]
        ax = figure.add_subplot(grid[g["y"] : g["y"] + g["h"] - 1, g["x"] : g["x"] + g["w"] - 1])
        ax.set_facecolor("#181b1f")
        ax.set_title(panel["title"], color="#d8d9da", fontsize=8.5, loc="left")
        ax.tick_params(colors="#9fa7b3", labelsize=6.5)
        for side in ax.spines.values():
            side.set_color("#2c3235")
        ax.grid(color="#2c3235", linewidth=0.5)
        unit = panel["fieldConfig"]["defaults"].get("unit", "short")
        ax.yaxis.set_major_formatter(formatter(unit))
        series = results[panel["id"]]
        for n, (label, points) in enumerate(series):
            xs = [t - start for t, _ in points]
            ys = [v for _, v in points]
            ax.plot(xs, ys, linewidth=1.1, color=colors[n % len(colors)], label=label)
        steps = panel["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
        for step in steps:
            if step.get("value") is not None:
                ax.axhline(step["value"], color="#f2495c", linestyle="--", linewidth=0.8)
        for at, _ in marks:
            ax.axvline(at - start, color="#b877d9", linestyle=":", linewidth=0.9)
        # Room above the lines for the legend, as Grafana puts it below.
        ax.set_ylim(0, max(ax.get_ylim()[1], 1e-9) * 1.3)
        ax.set_xlabel("seconds", color="#9fa7b3", fontsize=6.5, labelpad=1)
        if series:
            ax.legend(
                fontsize=6,
                loc="upper left",
                ncol=2,
                frameon=False,
                labelcolor="#d8d9da",
                handlelength=1.2,
            )
        else:
            ax.text(0.5, 0.5, "No data", color="#9fa7b3", ha="center", transform=ax.transAxes)
    figure.savefig(out, dpi=72, facecolor=figure.get_facecolor())
    plt.close(figure)


# -- the run ----------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the load runs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "dashboard.png")
    parser.add_argument("--kill-worker-at", type=float, default=0.5, help="fraction of the run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve_upstream:
        serve_upstream(options.serve_upstream)
        return
    if shutil.which("prometheus") is None:
        raise SystemExit("no prometheus binary on the PATH (apt-get install prometheus)")
    dashboard = json.loads(DASHBOARD.read_text())
    work = Path(tempfile.mkdtemp(prefix="octoplex-plot-"))
    processes: list[subprocess.Popen[bytes]] = []
    # The repository first on the path: its plugin and package are the ones run.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)

    def spawn(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with (work / f"{name}.out").open("wb") as out:
            process = subprocess.Popen(
                argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        processes.append(process)
        return process

    try:
        upstream_port, port, metrics_port, prometheus_port = (free_port() for _ in range(4))
        upstream = spawn(
            "upstream", [sys.executable, __file__, "--serve-upstream", str(upstream_port)]
        )
        wait_for(
            "the upstream",
            lambda: get(f"http://127.0.0.1:{upstream_port}/hello") == b"Hello world!",
            30,
            upstream,
        )
        daemon = spawn(
            "octoplex",
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "--logfile",
                str(work / "octoplex.log"),
                "octoplex",
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--metrics-listen",
                f"tcp:{metrics_port}:interface=127.0.0.1",
                "--allow-egress",
                "127.0.0.0/8",
                "--workers",
                "2",
                "--drain-timeout",
                "2",
                *CAPS,
            ],
        )
        wait_for(
            "Octoplex",
            lambda: (
                b"octoplex_workers_scraped 2.0" in get(f"http://127.0.0.1:{metrics_port}/metrics")
            ),
            60,
            daemon,
        )
        config = work / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {
                        "scrape_interval": f"{SCRAPE_INTERVAL}s",
                        "evaluation_interval": f"{SCRAPE_INTERVAL}s",
                    },
                    "rule_files": [str(ALERTS)],
                    "scrape_configs": [
                        {
                            "job_name": JOB,
                            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
                        }
                    ],
                }
            )
        )
        prometheus = spawn(
            "prometheus",
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
                "--log.level=warn",
            ],
        )
        base = f"http://127.0.0.1:{prometheus_port}"
        wait_for("Prometheus", lambda: get(f"{base}/-/ready") is not None, 60, prometheus)

        def scraped() -> bool:
            query = urllib.parse.urlencode({"query": f'up{{job="{JOB}"}} == 1'})
            return bool(json.loads(get(f"{base}/api/v1/query?{query}"))["data"]["result"])

        wait_for("Prometheus to scrape Octoplex", scraped, 30, prometheus)
        time.sleep(3 * SCRAPE_INTERVAL)

        start = time.time()
        traffic = spawn(
            "traffic",
            [
                sys.executable,
                str(TRAFFIC),
                "--octoplex",
                f"http://127.0.0.1:{port}",
                # A name, so that the DNS cache has lookups to count
                # (/etc/hosts answers it).
                "--upstream",
                f"http://localhost:{upstream_port}",
                "--duration",
                str(options.seconds),
                *LOAD,
            ],
        )
        marks: list[tuple[float, str]] = []
        kill_at = start + options.seconds * options.kill_worker_at
        while traffic.poll() is None:
            if time.time() > start + options.seconds + 90:
                raise SystemExit("the load did not end in time")
            if options.kill_worker_at and not marks and time.time() >= kill_at:
                workers = children(daemon.pid)
                if workers:
                    os.kill(workers[0], signal.SIGKILL)
                    marks.append((time.time(), f"worker pid {workers[0]} SIGKILLed"))
            time.sleep(0.2)
        time.sleep(4 * SCRAPE_INTERVAL)
        end = time.time()

        results: dict[int, list[tuple[str, list[tuple[float, float]]]]] = {}
        for panel in dashboard["panels"]:
            series = []
            for target in panel["targets"]:
                for found in query_range(base, target["expr"], start - 5, end):
                    points = [(float(t), float(v)) for t, v in found["values"]]
                    series.append((legend(target["legendFormat"], found["metric"]), points))
            results[panel["id"]] = series
            print(f"{panel['title']}: {len(series)} series", flush=True)
        summary = (work / "traffic.out").read_text().strip().splitlines()[-1]
        print("load:", summary)
        subtitle = (
            f"{options.seconds:g} s of load, 2 workers (one SIGKILLed at the dotted line), "
            f"Prometheus scraping every {SCRAPE_INTERVAL} s\n"
            f"load: deploy/traffic.py {' '.join(LOAD)}\n"
            f"daemon: twistd octoplex --workers 2 {' '.join(CAPS)}"
        )
        options.out.parent.mkdir(parents=True, exist_ok=True)
        draw(dashboard, results, start, marks, subtitle, options.out)
        print(f"wrote {options.out} ({options.out.stat().st_size // 1024} KiB)")
    finally:
        stop(processes)
        if options.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
