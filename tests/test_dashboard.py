"""
The Grafana dashboard (``deploy/grafana/octoplex.json``) and the Prometheus
alerting rules (``deploy/prometheus/alerts.yml``) against the daemon they
watch:

- every metric name a panel, a dashboard variable or a rule names is served
  by a real ``twistd octoplex`` that has carried a little traffic, both a
  single process and a master summing two workers (the names are read out
  of the PromQL by a tokenizer that leaves out functions, keywords, label
  names and variables; a ``_bucket`` name must belong to a histogram);
- the rules pass ``promtool check rules`` and their unit tests
  (``promtool test rules deploy/prometheus/alerts_test.yml``), and the
  compose setup's ``prometheus.yml`` passes ``promtool check config``.
  promtool is Debian's ``prometheus`` package: without it these tests skip,
  unless ``OCTOPLEX_REQUIRE_PROMTOOL`` is set (as CI sets it), when they fail;
- the dashboard declares one data source, a variable, and every panel and
  target uses it; panel ids are unique, and every panel has a title and
  targets with expressions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from .servers import Caller, Upstream
from .test_twistd import free_port, spawn_twistd, stop, wait_until_healthy, within

try:
    import yaml
except ImportError:  # pragma: no cover - setup.py's test extra installs it
    yaml = None

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "octoplex.json"
PROMETHEUS = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERTS_TEST = PROMETHEUS / "alerts_test.yml"
PROMETHEUS_CONFIG = PROMETHEUS / "prometheus.yml"

#: The data source every panel and target must name: the dashboard's
#: variable of type datasource.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

#: Names only a master (``--workers`` above 1 with ``--metrics-listen``) serves.
MASTER_ONLY = frozenset({"octoplex_worker_restarts_total", "octoplex_workers_scraped"})

#: Seconds promtool may take.
PROMTOOL_TIMEOUT = 60


# -- reading PromQL ----------------------------------------------------------

_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<comment>\#[^\n]*)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<duration>\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*(?![a-zA-Z0-9_:]))
    | (?P<number>(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?![a-zA-Z0-9_:]))
    | (?P<variable>\$\{[^}]*\}|\$[a-zA-Z_][a-zA-Z0-9_]*)
    | (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<open>[({\[])
    | (?P<close>[)}\]])
    | (?P<other>\S)
    """,
    re.VERBOSE,
)

#: Aggregation operators: never metric names, whatever follows them.
AGGREGATIONS = frozenset(
    "sum min max avg group stddev stdvar count count_values bottomk topk quantile "
    "limitk limit_ratio".split()
)
#: Keywords followed by a parenthesised list of label names.
LABEL_LISTS = frozenset("by without on ignoring group_left group_right".split())
#: Other keywords and literals.
KEYWORDS = frozenset("and or unless bool offset atan2 inf nan start end".split())


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens = []
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        assert match is not None, f"cannot read {expr[position:]!r} in {expr!r}"
        position = match.end()
        kind = match.lastgroup
        assert kind is not None
        if kind not in ("space", "comment"):
            tokens.append((kind, match.group()))
    return tokens


def _skip_group(tokens: list[tuple[str, str]], at: int) -> int:
    """The index after the bracketed group that opens at ``tokens[at]``."""
    closing = {"(": ")", "{": "}", "[": "]"}[tokens[at][1]]
    depth = 0
    for index in range(at, len(tokens)):
        if tokens[index][1] == tokens[at][1]:
            depth += 1
        elif tokens[index][1] == closing:
            depth -= 1
            if depth == 0:
                return index + 1
    raise AssertionError(f"unbalanced {tokens[at][1]} in {tokens}")


def metric_names(expr: str) -> set[str]:
    """
    The metric names a PromQL expression selects: its identifiers, less
    functions (an identifier before ``(``), aggregations and keywords,
    label matchers (``{...}``), ranges and subqueries (``[...]``), the
    label lists of ``by``/``without``/``on``/``ignoring``/``group_left``/
    ``group_right``, strings, numbers, durations and Grafana variables.
    """
    tokens = _tokens(expr)
    names = set()
    index = 0
    while index < len(tokens):
        kind, text = tokens[index]
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if text in ("{", "["):
            index = _skip_group(tokens, index)
            continue
        if kind == "name":
            lowered = text.lower()
            if lowered in LABEL_LISTS:
                index += 1
                if following == "(":
                    index = _skip_group(tokens, index)
                continue
            if lowered == "offset":
                index += 2
                continue
            if lowered not in AGGREGATIONS and lowered not in KEYWORDS and following != "(":
                names.add(text)
        index += 1
    return names


def test_the_tokenizer_finds_only_metric_names() -> None:
    """Functions, keywords, label names, strings, numbers, durations and variables are no names."""
    cases = {
        'sum by (le) (rate(foo_bucket{job=~"$job", le="0.5"}[$__rate_interval]))': {"foo_bucket"},
        "a / ignoring (cause) group_left b > bool 1e3": {"a", "b"},
        "sum(rate(x[5m] offset 1h)) by (instance) or on (job, instance) y unless z": {
            "x",
            "y",
            "z",
        },
        "histogram_quantile(0.99, sum without (pod) (rate(h_bucket[1m])))": {"h_bucket"},
        "max_over_time(q[5m:30s]) and Inf > NaN": {"q"},
        'label_replace(v, "dst", "$1", "src", "(.*)") * on() group_right() w': {"v", "w"},
        "topk(5, ns:octoplex_rate5m) > 0x1F": {"ns:octoplex_rate5m"},
        "sum by(instance)(changes(p[15m])) > 0 and on(job) l # a comment naming c": {"p", "l"},
    }
    for expr, expected in cases.items():
        assert metric_names(expr) == expected, expr


# -- the files ---------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    if yaml is None:
        pytest.fail("PyYAML is not installed: setup.py's test extra has it", pytrace=False)
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return document


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def expressions() -> dict[str, str]:
    """
    Every PromQL expression of the dashboard and the rules, by where it is.
    A variable's ``label_values(METRIC, LABEL)`` is given as ``METRIC``.
    """
    found = {}
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            found[f"panel {panel['title']!r} target {target['refId']}"] = target["expr"]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\(\s*(.+?)\s*,\s*\w+\s*\)", text)
            assert match is not None, f"variable {variable['name']}: {text!r}"
            found[f"variable {variable['name']}"] = match.group(1)
    for rule in rules():
        found[f"rule {rule.get('alert') or rule.get('record')}"] = rule["expr"]
    return found


# -- the names against a real scrape -----------------------------------------


def _raw(port: int, data: bytes) -> bytes:
    """Send ``data`` on a new connection to ``port``; what comes back before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("workers", [1, 2])
@pytest_twisted.ensureDeferred
async def test_every_name_is_in_a_real_scrape(
    tmp_path: Path, caller: Caller, upstream: Upstream, workers: int
) -> None:
    """
    Every metric name of the dashboard and the rules is served by twistd
    octoplex (one process, and a master of two workers) once it has carried
    traffic of every kind: a _bucket name is a histogram's.
    """
    port, metrics_port = free_port(), free_port()
    output = tmp_path / "output.txt"
    process = spawn_twistd(
        port,
        tmp_path / "octoplex.log",
        output,
        "--metrics-listen",
        f"tcp:{metrics_port}:interface=127.0.0.1",
        workers=workers,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_until_healthy(process, caller, url, output)
        # Successes (a name, for the DNS cache), a refused connection, the
        # egress policy's refusal, and a deadline, in each worker's hands.
        local = upstream.url.replace("127.0.0.1", "localhost")
        batch = {
            "timeout_msec": 500,
            "requests": [
                {"uri": local + "/hello"},
                {"uri": upstream.url + "/status/503"},
                {"uri": f"http://127.0.0.1:{free_port()}/"},
                # Loopback, but outside --allow-egress 127.0.0.0/8: refused before
                # any packet, and nothing could leave the machine anyway.
                {"uri": f"http://[::1]:{free_port()}/"},
                {"uri": upstream.url + "/delay/3000"},
            ],
        }
        for _ in range(2 * workers):
            status, _, answer = await within(10.0, caller.post(url + "/multiplex", batch))
            assert status == 200, answer
        # A request the HTTP parser refuses before the app: 400.
        assert _raw(port, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400")
        status, _, body = await within(10.0, caller.get(f"http://127.0.0.1:{metrics_port}/metrics"))
        assert status == 200, body
    finally:
        stop(process)
    samples: set[str] = set()
    kinds: dict[str, str] = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        kinds[family.name] = family.type
        samples.update(sample.name for sample in family.samples)
    missing = {}
    for where, expr in expressions().items():
        for name in metric_names(expr):
            if workers == 1 and name in MASTER_ONLY:
                continue
            if name not in samples:
                missing[where] = name
            elif name.endswith("_bucket"):
                family = name.removesuffix("_bucket")
                assert kinds.get(family) == "histogram", f"{where}: {name} is no histogram's"
    assert not missing, f"names not in /metrics: {missing}"


# -- promtool ----------------------------------------------------------------


def promtool(*arguments: str) -> None:
    """
    Run ``promtool`` in deploy/prometheus, bounded in time; fail with its
    output if it fails.  Without promtool: skip, or fail where
    OCTOPLEX_REQUIRE_PROMTOOL is set.
    """
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("OCTOPLEX_REQUIRE_PROMTOOL"):
            pytest.fail(
                "promtool is not installed and OCTOPLEX_REQUIRE_PROMTOOL is set: "
                "install Debian's prometheus package (apt-get install prometheus)",
                pytrace=False,
            )
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    result = subprocess.run(
        [found, *arguments],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT,
        check=False,
    )
    command = " ".join(arguments)
    assert result.returncode == 0, f"promtool {command}:\n{result.stdout}{result.stderr}"


def test_promtool_checks_the_rules() -> None:
    """promtool check rules accepts deploy/prometheus/alerts.yml."""
    promtool("check", "rules", ALERTS.name)


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    """promtool test rules runs deploy/prometheus/alerts_test.yml's cases, and they pass."""
    promtool("test", "rules", ALERTS_TEST.name)


def test_promtool_checks_the_compose_config() -> None:
    """promtool check config accepts compose's prometheus.yml and the rule file it names."""
    promtool("check", "config", PROMETHEUS_CONFIG.name)


def test_every_alert_is_labelled_annotated_and_tested() -> None:
    """
    Every rule is an alert with a severity and a summary and description;
    alerts_test.yml has, for each one, an evaluation where it fires and one
    where it does not.
    """
    tests = load_yaml(ALERTS_TEST)
    assert tests["rule_files"] == [ALERTS.name]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for evaluation in case.get("alert_rule_test", []):
            (firing if evaluation.get("exp_alerts") else quiet).add(evaluation["alertname"])
    names = []
    for rule in rules():
        name = rule.get("alert")
        assert name, f"a recording rule where alerts were expected: {rule}"
        names.append(name)
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"].strip(), name
        assert rule["annotations"]["description"].strip(), name
        assert name in firing, f"{name}: no test where it fires"
        assert name in quiet, f"{name}: no test where it does not fire"
    assert len(names) == len(set(names)), names


# -- the dashboard's shape ---------------------------------------------------


def test_the_dashboard_uses_its_one_datasource_everywhere() -> None:
    """
    The dashboard declares one Prometheus data source variable, and every
    panel, target and query variable names it, and nothing else.
    """
    document = dashboard()
    variables = document["templating"]["list"]
    [source] = [v for v in variables if v["type"] == "datasource"]
    assert (source["name"], source["query"]) == ("datasource", "prometheus")
    assert "__inputs" not in document, "a variable, not an import-time input"
    for variable in variables:
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]
    for panel in document["panels"]:
        assert panel.get("datasource") == DATASOURCE, panel["title"]
        for target in panel.get("targets", []):
            assert target.get("datasource") == DATASOURCE, (panel["title"], target["refId"])
    # No other data source hides anywhere else in the document either.
    text = json.dumps(document)
    assert set(re.findall(r'"uid": "([^"]*)"', text)) <= {"${datasource}", "octoplex"} | {
        "-- Grafana --"
    }


def test_the_dashboard_panels_are_whole() -> None:
    """Panel ids are unique; each panel has a title and targets with an expression and a refId
    of their own; panels lie within the 24-column grid without overlapping."""
    document = dashboard()
    assert document["schemaVersion"] >= 36
    assert document["uid"] and document["title"]
    panels = document["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), ids
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        assert panel.get("title", "").strip(), panel["id"]
        targets = panel.get("targets", [])
        assert targets, panel["title"]
        for target in targets:
            assert target.get("expr", "").strip(), (panel["title"], target.get("refId"))
        refs = [target["refId"] for target in targets]
        assert len(refs) == len(set(refs)), panel["title"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[x, y]}"
                cells[x, y] = panel["title"]
