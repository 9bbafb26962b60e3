"""The deployment files, checked against the server they deploy: the Kubernetes manifests
against Kubernetes' own schemas (kubernetes-validate: its bundled OpenAPI schemas, offline),
the ConfigMap's config against the settings reader and `duckswap check-config`, the Dockerfile
by a line parser, and the probes, the image's HEALTHCHECK and every metric name and label of
the Grafana dashboard and the Prometheus alerts against a real `duckswap serve` run as the pod
runs it (the image's environment, the ConfigMap's config, the Secret's variable)."""

from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.ports import free_port
from data.generate import DATASETS, write_export
from engine.config import ConfigError
from engine.settings import apply_env, load_settings
from serving.cli import main as duckswap

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "kubernetes"
DASHBOARD = REPO / "deploy" / "grafana" / "duckswap.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

# Not applied by `kubectl apply -k`: the Secret is created with kubectl, the ServiceMonitor
# needs the Prometheus Operator's CRDs (each file says so).
NOT_APPLIED = {"secret.example.yaml", "servicemonitor.yaml"}
# The oldest Kubernetes minor the manifests are checked against; the newest is the newest
# that kubernetes-validate bundles.
OLDEST_KUBERNETES = 30
# Labels Prometheus adds to every scraped series (the target's), not in /metrics itself.
TARGET_LABELS = {"job", "instance"}
# Series of other exporters the alerts use (kube-state-metrics), not checked on the scrape.
OTHER_METRICS = {"kube_deployment_status_replicas_available", "kube_deployment_spec_replicas"}
# Grafana's variables, as the dashboard's queries would run.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": "duckswap", "$instance": ".*"}
# `loaders.supervisor.Supervisor.stop` waits drain + shutdown + 5 s for each worker before it
# kills it; stopping the loader and the build processes after that takes a second or two.
WORKER_WAIT_S = 5.0
CHILDREN_S = 2.0
TOKEN = "0123456789abcdef-test-token"
# The swap peak measured with server.workers = 2 on the default demo data: total PSS, bytes.
PEAK_PSS = 955e6


# --- the files ---------------------------------------------------------------------------

def manifests() -> dict[str, list[dict[str, Any]]]:
    """Every Kubernetes object under deploy/kubernetes, by file (kustomization.yaml aside)."""
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"}


def obj(kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [d for docs in manifests().values() for d in docs
                if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return found


def container() -> dict[str, Any]:
    (c,) = obj("Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def config_path() -> str:
    args = container()["args"]
    return str(args[args.index("--config") + 1])


def configmap_toml() -> str:
    """The config the pod reads: the ConfigMap's key mounted at --config's path."""
    spec = obj("Deployment")["spec"]["template"]["spec"]
    (mount,) = [m for m in container()["volumeMounts"]
                if config_path().startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    (item,) = [i for i in volume["configMap"]["items"]
               if f"{mount['mountPath']}/{i['path']}" == config_path()]
    cm = obj("ConfigMap")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    return str(cm["data"][item["key"]])


def mount_path(volume: str) -> str:
    (m,) = [m for m in container()["volumeMounts"] if m["name"] == volume]
    return str(m["mountPath"])


@dataclass
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form instruction (refused otherwise)."""
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(a, str) for a in value), self
        return value


def dockerfile_stages() -> list[list[Instruction]]:
    """The Dockerfile's instructions, stage by stage: comment lines (and parser directives)
    dropped, continuation lines joined, as Docker reads them."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        keyword, _, args = (pending + text).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "a continuation line ends the file"
    assert instructions[0].keyword == "FROM"
    stages: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            stages.append([])
        stages[-1].append(ins)
    return stages


def final_stage() -> list[Instruction]:
    return dockerfile_stages()[-1]


def only(stage: list[Instruction], keyword: str) -> Instruction:
    (found,) = [i for i in stage if i.keyword == keyword]
    return found


def image_env() -> dict[str, str]:
    """The ENV of the image's final stage."""
    env = {}
    for ins in final_stage():
        if ins.keyword == "ENV":
            for word in shlex.split(ins.args):
                name, sep, value = word.partition("=")
                assert sep, f"ENV {ins.args}: use NAME=value"
                env[name] = value
    return env


def healthcheck() -> tuple[dict[str, str], list[str]]:
    """The HEALTHCHECK's options and its exec-form command."""
    options, sep, command = only(final_stage(), "HEALTHCHECK").args.partition("CMD ")
    assert sep, "HEALTHCHECK CMD ..."
    opts = dict(o.removeprefix("--").split("=", 1) for o in options.split())
    return opts, Instruction("CMD", command).exec_form()


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert match, duration
    return float(match.group(1)) * units[match.group(2)]


def quantity(text: str) -> float:
    """A Kubernetes quantity (`768Mi`, `2`, `500m`) as a number."""
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6,
                "G": 1e9, "m": 1e-3, "": 1}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|m|)", str(text))
    assert match, text
    return float(match.group(1)) * suffixes[match.group(2)]


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


# --- the pod: `duckswap serve` as the Deployment runs it -------------------------------------

@dataclass
class Pod:
    base: str
    port: int
    log: Path

    def metrics(self) -> str:
        status, body = get(self.base + "/metrics")
        assert status == 200
        return body.decode()


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    """The container's args, the ConfigMap's config, the image's environment and the pod's
    (the admin token); only the source (a small demo export in a folder, not the bucket), the
    data dir, the address (loopback) and the port differ. The run's second export has an
    unreadable `champions`: refused, so the scrape has refused and held loads too. Stopped
    with SIGTERM at the end: it must exit 0 within the grace period left after preStop."""
    tmp = tmp_path_factory.mktemp("pod")
    src = tmp / "src"
    write_export(src, 1, size="small")
    write_export(src, 2, size="small", datasets=tuple(d for d in DATASETS if d != "champions"))
    bad = src / "champions" / "export-000002"
    bad.mkdir(parents=True)
    (bad / "part-00000.parquet").write_bytes(b"not a parquet file")
    (bad / "_SUCCESS").write_text("")
    config = tmp / "duckswap.toml"
    config.write_text(configmap_toml())
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUCKSWAP_")}
    env |= image_env()
    env |= {
        "DUCKSWAP_SERVER__ADMIN_TOKEN": TOKEN,
        "DUCKSWAP_SERVER__HOST": '"127.0.0.1"',
        "DUCKSWAP_SERVER__PORT": str(port),
        "DUCKSWAP_SERVER__DATA_DIR": f'"{tmp / "data"}"',
        "DUCKSWAP_SOURCE__URL": f'"file://{src}"',
    }
    args = container()["args"]
    assert args[0] == "duckswap"
    cmd = [sys.executable, "-m", "serving.cli",
           *[str(config) if a == config_path() else a for a in args[1:]]]
    log = tmp / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT)
    pod = Pod(f"http://127.0.0.1:{port}", port, log)
    try:
        deadline = time.monotonic() + 60
        while not _ready(pod):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        while 'outcome="refused"' not in pod.metrics():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        for _ in range(4):  # requests to time, on whichever worker the kernel picks
            assert get(pod.base + "/v1/champions?prefix=a")[0] == 200
        yield pod
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=grace_after_prestop())
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("the server outlived the grace period") from None
    output = log.read_text()
    assert code == 0, output[-3000:]
    assert "duckswap: stopped" in output and "Traceback" not in output, output[-3000:]


def _ready(pod: Pod) -> bool:
    try:
        return get(pod.base + "/readyz", timeout=1)[0] == 200
    except OSError:
        return False


def grace_after_prestop() -> float:
    spec = obj("Deployment")["spec"]["template"]["spec"]
    return float(spec["terminationGracePeriodSeconds"]) - prestop_seconds()


def prestop_seconds() -> float:
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] in ("sleep", "/bin/sleep") and len(command) == 2, command
    return float(command[1])


# --- Kubernetes ----------------------------------------------------------------------------

def test_the_manifests_pass_the_kubernetes_schemas() -> None:
    """Strict: an unknown field (a typo, a field newer than the cluster) fails too."""
    newest = int(kubernetes_validate.latest_version().split(".")[1])
    versions = [f"1.{minor}" for minor in range(OLDEST_KUBERNETES, newest + 1)]
    assert len(versions) >= 2, versions
    checked = []
    for name, docs in manifests().items():
        for doc in docs:
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # a CRD: test_the_service_monitor_scrapes_the_http_port
            for version in versions:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    pytest.fail(f"{name}: {doc['kind']} on Kubernetes {version}: {exc}")
            checked.append(doc["kind"])
    assert sorted(checked) == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Secret",
                               "Service", "Service", "ServiceAccount"]


def test_the_kustomization_lists_the_manifests() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(set(manifests()) - NOT_APPLIED)
    (image,) = kustomization["images"]
    assert container()["image"].split(":")[0] == image["name"]
    for name, docs in manifests().items():
        for doc in docs:
            labels = doc["metadata"]["labels"]
            assert labels["app.kubernetes.io/name"] == "duckswap", name


def test_the_service_monitor_scrapes_the_http_port() -> None:
    """No schema for the operator's CRD here: checked by hand."""
    monitor, service = obj("ServiceMonitor"), obj("Service", "duckswap")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
    assert endpoint["path"] == "/metrics"
    # The operator's target label `endpoint` would rename duckswap's own `endpoint` label.
    assert endpoint["honorLabels"] is True
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "honorLabels"}
    # one scrape per pod: the headless Service's pods are the same ones
    headless = obj("Service", "duckswap-headless")["metadata"]["labels"]
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= headless.items()


def test_the_service_and_the_probes_target_the_server_port(tmp_path: Path) -> None:
    deployment, service = obj("Deployment"), obj("Service", "duckswap")
    pdb, headless = obj("PodDisruptionBudget"), obj("Service", "duckswap-headless")
    settings = load_settings(_config_file(tmp_path), {})
    (port,) = container()["ports"]
    assert port["name"] == "http" and port["containerPort"] == settings.port == 8080
    (service_port,) = service["spec"]["ports"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service_port["port"] == 80 and service_port["targetPort"] == "http"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    # every replica's own address, on the server's port: what HAProxy's server-template names
    (headless_port,) = headless["spec"]["ports"]
    assert headless["spec"]["clusterIP"] == "None" and headless_port["targetPort"] == "http"
    assert headless["spec"]["selector"].items() <= pod_labels.items()
    haproxy = (REPO / "deploy" / "haproxy" / "haproxy.cfg").read_text()
    assert (f" {headless['metadata']['name']}.default.svc.cluster.local:"
            f"{headless_port['port']} check") in haproxy
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert deployment["spec"]["replicas"] == 2
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") == 1
    c = container()
    paths = {probe: c[probe]["httpGet"]["path"]
             for probe in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert paths == {"startupProbe": "/healthz", "readinessProbe": "/readyz",
                     "livenessProbe": "/healthz"}
    for probe in paths:
        assert c[probe]["httpGet"]["port"] == "http"
    readiness, liveness = c["readinessProbe"], c["livenessProbe"]
    assert readiness["periodSeconds"] == 2 and readiness["failureThreshold"] <= 2
    # Generous: a minute without any worker answering /healthz before a restart.
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port["containerPort"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_probes_answer_on_a_running_pod(pod: Pod) -> None:
    """Every probe's path on the server the pod runs (ready: every one 200), and the path
    Prometheus scrapes."""
    c = container()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        path = c[probe]["httpGet"]["path"]
        status, body = get(pod.base + path)
        assert status == 200, (probe, path, body[:300])
    annotations = obj("Deployment")["spec"]["template"]["metadata"]["annotations"]
    status, body = get(pod.base + annotations["prometheus.io/path"])
    assert status == 200 and b"duckswap_workers " in body
    assert get(pod.base + "/no-such-probe")[0] == 404  # a wrong path would not pass


def _config_file(folder: Path) -> Path:
    """The ConfigMap's config as the pod's file."""
    path = folder / "duckswap.toml"
    path.write_text(configmap_toml())
    return path


def test_the_configmap_serves_the_demo_endpoints() -> None:
    """The ConfigMap copies the demo's datasets, groups and endpoints (kustomize reads no file
    outside its folder): a change to data/demo.toml must be made there too."""
    pod, demo = tomllib.loads(configmap_toml()), tomllib.loads(
        (REPO / "data" / "demo.toml").read_text())
    for table in ("datasets", "groups", "endpoints"):
        assert pod[table] == demo[table], f"[{table}] differs from data/demo.toml"


def test_the_configmap_is_a_valid_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The config the pod gets (the ConfigMap's file, the image's environment and the
    Secret's variable) passes `duckswap check-config` (every key, and every endpoint's SQL
    prepared: the bucket is not reached), and gives the settings the manifests assume."""
    path = _config_file(tmp_path)
    (env_var,) = container()["env"]
    secret = obj("Secret")
    ref = env_var["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    pod_env = image_env() | {env_var["name"]: TOKEN}
    # The variable is one the settings reader honours, for the key it means.
    assert apply_env({}, {env_var["name"]: TOKEN}) == {"server.admin_token": env_var["name"]}
    # Service links (off in the Deployment) would name no setting: no `__` in their names.
    links = {"DUCKSWAP_SERVICE_HOST": "10.0.0.1", "DUCKSWAP_PORT": "tcp://10.0.0.1:80",
             "DUCKSWAP_PORT_80_TCP_PORT": "80", "DUCKSWAP_SERVICE_PORT_HTTP": "80"}
    assert apply_env({}, links) == {}
    settings = load_settings(path, pod_env)
    assert settings.admin_token == TOKEN
    assert settings.host == "0.0.0.0"
    assert settings.source_url == "gs://YOUR-BUCKET/exports"
    assert settings.data_dir == mount_path("data")
    assert settings.workers == quantity(container()["resources"]["requests"]["cpu"]) == 2
    assert settings.token is None  # google_default: Workload Identity
    for name in [n for n in os.environ if n.startswith("DUCKSWAP_")]:
        monkeypatch.delenv(name)
    for name, value in pod_env.items():
        monkeypatch.setenv(name, value)
    assert duckswap(["check-config", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: ok (5 datasets, 6 endpoints)\n"
    # The example Secret's placeholder is refused: applied by mistake, the pod does not start
    # with a token everyone can read.
    with pytest.raises(ConfigError) as refused:
        load_settings(path, {env_var["name"]: secret["stringData"][ref["key"]]})
    assert str(refused.value) == (f"{env_var['name']}: server.admin_token: must be at least "
                                  "16 characters")


def test_the_grace_period_covers_the_stop(tmp_path: Path) -> None:
    """preStop, then the server's own stop (drain_seconds, shutdown_seconds from the config;
    the supervisor's wait for a worker that has not exited; the loader and build processes),
    within terminationGracePeriodSeconds. The fixture `pod` measures the real stop."""
    settings = load_settings(_config_file(tmp_path), {})
    spec = obj("Deployment")["spec"]["template"]["spec"]
    assert prestop_seconds() == 5 and settings.drain_seconds == 0
    assert settings.shutdown_seconds == 10
    needed = (prestop_seconds() + settings.drain_seconds + settings.shutdown_seconds
              + WORKER_WAIT_S + CHILDREN_S)
    assert spec["terminationGracePeriodSeconds"] >= needed + 5, needed  # and a margin
    # The endpoint leaves the Service while preStop sleeps: longer than a readiness period.
    assert prestop_seconds() > container()["readinessProbe"]["periodSeconds"]


def test_the_resources_and_security_context_match_the_server() -> None:
    c, spec = container(), obj("Deployment")["spec"]["template"]["spec"]
    requests, limits = c["resources"]["requests"], c["resources"]["limits"]
    assert quantity(requests["memory"]) >= PEAK_PSS
    assert quantity(limits["memory"]) > quantity(requests["memory"])
    assert "cpu" not in limits  # see the comment: throttling stalls the event loops
    user = only(final_stage(), "USER").args
    uid, _, gid = user.partition(":")
    assert spec["securityContext"]["runAsUser"] == int(uid) != 0
    assert spec["securityContext"]["runAsGroup"] == int(gid)
    assert spec["securityContext"]["runAsNonRoot"] is True
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    # With a read-only root, what the server writes is mounted: the data dir and /tmp.
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes["data"] and "emptyDir" in volumes["tmp"]
    assert mount_path("data") == "/var/lib/duckswap" and mount_path("tmp") == "/tmp"
    assert c["workingDir"] == mount_path("tmp")  # DuckDB spills in-memory queries to ./.tmp
    # `args`, not `command`: the image's ENTRYPOINT (tini) stays PID 1.
    assert "command" not in c
    assert spec["enableServiceLinks"] is False


# --- the Dockerfile ------------------------------------------------------------------------

def test_the_dockerfile() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: a builder, then the runtime"
    builder, final = stages[0], stages[-1]
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?(@sha256:[0-9a-f]{64})?( AS \w+)?",
                        final[0].args, re.IGNORECASE), final[0].args
    builder_name = builder[0].args.split()[-1]
    assert any("pip wheel" in i.args for i in builder if i.keyword == "RUN")
    runs = " ".join(i.args for i in final if i.keyword == "RUN")
    assert f"from={builder_name}" in runs and "--no-index" in runs  # only the built wheels
    for word in ("[test]", "[bench]", "gcc", "build-essential"):
        assert word not in runs, word
    assert not any(i.keyword == "COPY" and "--from" not in i.args for i in final)
    user = only(final, "USER").args
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), "a numeric uid that is not root"
    assert f"--uid {user.split(':')[0]}" in runs
    workdir = only(final, "WORKDIR").args
    assert f"--home-dir {workdir}" in runs and "--create-home" in runs  # the demo writes here
    assert only(final, "EXPOSE").args == str(container()["ports"][0]["containerPort"])
    env = image_env()
    volume = only(final, "VOLUME").args
    assert volume == "/var/lib/duckswap" == mount_path("data")
    assert tomllib.loads(f"v = {env['DUCKSWAP_SERVER__DATA_DIR']}")["v"] == volume
    assert f"chown {user} {volume}" in runs
    assert tomllib.loads(f"v = {env['DUCKSWAP_SERVER__HOST']}")["v"] == "0.0.0.0"
    entrypoint = only(final, "ENTRYPOINT").exec_form()
    cmd = only(final, "CMD").exec_form()
    assert entrypoint == ["/usr/bin/tini", "--"] and "install -y --no-install-recommends tini" \
        in runs
    assert cmd == ["duckswap", "serve"]  # the demo; the Deployment's args replace it
    assert container()["args"][:2] == cmd
    assert only(final, "STOPSIGNAL").args == "SIGTERM"
    options, command = healthcheck()
    assert any("/healthz" in part for part in command)
    assert seconds(options["timeout"]) <= seconds(options["interval"])


def test_the_healthcheck_exits_0_on_a_live_server_and_not_on_a_closed_port(pod: Pod) -> None:
    """The HEALTHCHECK's exact command (the image's `python` is this interpreter), its port
    from DUCKSWAP_SERVER__PORT as in the container."""
    options, command = healthcheck()
    assert command[0] == "python"
    argv = [sys.executable, *command[1:]]
    limit = seconds(options["timeout"])
    env = {"PATH": os.environ.get("PATH", "")}
    started = time.monotonic()
    live = subprocess.run(argv, env=env | {"DUCKSWAP_SERVER__PORT": str(pod.port)},
                          capture_output=True, timeout=limit)
    assert live.returncode == 0, live.stderr.decode()
    assert time.monotonic() - started < limit
    closed = subprocess.run(argv, env=env | {"DUCKSWAP_SERVER__PORT": str(free_port())},
                            capture_output=True, timeout=limit)
    assert closed.returncode != 0 and b"Connection refused" in closed.stderr


def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore's rules as (exception, pattern), in order. Docker's syntax as far as this
    file uses it: `*`, `?`, `**/`, `!`; a pattern matching a folder excludes what it holds."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        exception = text.startswith("!")
        pattern = text.removeprefix("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/|\*|\?)", pattern):
            regex += {"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        rules.append((exception, re.compile(regex)))
    return rules


def _excluded(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    out = False
    for exception, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            out = not exception
    return out


def test_the_docker_build_context_builds_the_wheel(tmp_path: Path) -> None:
    """What the builder stage does, here: the build context (the repository less
    .dockerignore) holds what the wheel needs, and nothing local; the wheel built from it
    holds the server, the demo config and the `duckswap` command."""
    rules = _dockerignore()
    context = tmp_path / "context"
    sent = []
    for folder, dirs, files in os.walk(REPO):
        rel = Path(folder).relative_to(REPO).as_posix()
        rel = "" if rel == "." else rel + "/"
        dirs[:] = [d for d in dirs if not _excluded(rel + d, rules)]
        for f in files:
            if not _excluded(rel + f, rules):
                sent.append(rel + f)
                (context / rel).mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(folder) / f, context / rel / f)
    tops = {s.split("/")[0] for s in sent}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"],
              *project["tool"]["setuptools"]["packages"]}
    assert needed <= tops, needed - tops
    for local in (".git", ".venv", "tests", "docs", "deploy", "bench-results", "duckswap-demo",
                  "duckswap.egg-info", "Dockerfile", "CHANGELOG.md"):
        assert local not in tops, local
    assert not [s for s in sent if "__pycache__" in s or s.endswith(".pyc")]
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-cache-dir", "--quiet", "--wheel-dir", str(wheels), str(context)],
                   check=True, capture_output=True, timeout=120)
    (wheel,) = wheels.glob("duckswap-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = z.read(entry_points).decode()
    assert {"data/demo.toml", "data/generate.py", "serving/cli.py", "serving/worker.py",
            "loaders/loader.py", "engine/settings.py"} <= names
    assert "duckswap = serving.cli:main" in scripts


# --- Grafana and Prometheus ------------------------------------------------------------------

@dataclass
class Scrape:
    labels: dict[str, set[str]]  # sample name -> its label names
    values: dict[tuple[str, str], set[str]]  # (sample name, label) -> values seen
    histograms: set[str]  # histogram family names (as text mentions them)


def scrape(text: str) -> Scrape:
    labels: dict[str, set[str]] = {}
    values: dict[tuple[str, str], set[str]] = {}
    histograms = set()
    for family in text_string_to_metric_families(text):
        if family.type == "histogram":
            histograms.add(family.name)
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
            for k, v in sample.labels.items():
                values.setdefault((sample.name, k), set()).add(v)
    return Scrape(labels, values, histograms)


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard query and alert, Grafana's variables replaced."""
    out = []
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r}", target["expr"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "datasource":
            continue  # DS_PROMETHEUS, for a dashboard provisioned from a file
        match = re.fullmatch(r"label_values\((.+), *(\w+)\)", var["query"]["query"])
        assert match, var
        # label_values(SELECTOR, LABEL): the selector, grouped by the label.
        out.append((f"variable {var['name']}", f"group by ({match[2]}) ({match[1]})"))
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            out.append((f"alert {rule['alert']}", rule["expr"]))
    replaced = []
    for where, expr in out:
        for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(variable, value)
        assert "$" not in expr, (where, expr)
        replaced.append((where, expr))
    return replaced


def _metrics_under(node: Any) -> list[str]:
    """The metric names an expression selects."""
    found: list[str] = []

    def visit(n: Any) -> None:
        if isinstance(n, promql_parser.VectorSelector):
            found.append(n.name)

    promql_parser.walk(node, visit)
    return found


def _problems(where: str, expr: str, seen: Scrape) -> list[str]:
    """Every metric, label and `=` matcher value of `expr` not in the scrape."""
    problems: list[str] = []

    def labels_of(name: str) -> set[str] | None:
        if name in OTHER_METRICS:
            return None  # another exporter's: not checked here
        if name not in seen.labels:
            problems.append(f"{where}: no metric {name} in /metrics")
            return None
        return seen.labels[name] | TARGET_LABELS

    def need(label_names: list[str], node: Any, what: str) -> None:
        for name in _metrics_under(node):
            known = labels_of(name)
            for label in label_names:
                if known is not None and label not in known:
                    problems.append(f"{where}: {what} label {label!r}: not a label of {name}")

    def visit(n: Any) -> None:
        if isinstance(n, promql_parser.VectorSelector):
            known = labels_of(n.name)
            for m in n.matchers.matchers:
                if known is not None and m.name not in known:
                    problems.append(f"{where}: {n.name} has no label {m.name!r}")
                elif (known is not None and m.op == promql_parser.MatchOp.Equal
                      and m.name not in TARGET_LABELS
                      and m.value not in seen.values.get((n.name, m.name), set())):
                    problems.append(f"{where}: {n.name}{{{m.name}={m.value!r}}}: no such "
                                    f"value in /metrics "
                                    f"({sorted(seen.values.get((n.name, m.name), set()))})")
        elif isinstance(n, promql_parser.AggregateExpr) and n.modifier is not None:
            need(list(n.modifier.labels), n.expr, f"aggregation {n.modifier}")
        elif (isinstance(n, promql_parser.BinaryExpr) and n.modifier is not None
              and n.modifier.matching is not None):
            need(list(n.modifier.matching.labels), n, "vector matching")

    promql_parser.walk(promql_parser.parse(expr), visit)
    return list(dict.fromkeys(problems))


def test_every_metric_and_label_of_the_dashboard_and_the_alerts_is_in_a_scrape(
        pod: Pod) -> None:
    """Parsed as PromQL (a syntax error fails), each metric name against a real /metrics of
    the pod (the suffix included: `_total`, `_bucket`, `_count`), each label of a selector,
    a `by`/`without` or an `on`/`ignoring` on that metric, and each `=` matcher's value
    (`outcome="loaded"`, `result="hit"`) among the values the scrape has."""
    seen = scrape(pod.metrics())
    problems = []
    used = set()
    for where, expr in expressions():
        problems += _problems(where, expr, seen)
        used |= set(_metrics_under(promql_parser.parse(expr)))
    assert not problems, "\n".join(problems)
    # What the dashboard and the alerts must show, still shown.
    assert {"duckswap_request_duration_seconds_count",
            "duckswap_request_duration_seconds_bucket", "duckswap_cache_lookups_total",
            "duckswap_export_age_seconds", "duckswap_loads_total", "duckswap_refused_exports",
            "duckswap_workers", "duckswap_worker_restarts_total",
            "duckswap_event_loop_lag_seconds_bucket", "duckswap_incomplete_runs"} <= used
    # Names in descriptions and comments too: every duckswap_ name is a real one.
    known = set(seen.labels) | seen.histograms
    for path in (DASHBOARD, ALERTS):
        for name in set(re.findall(r"duckswap_[a-z_]+[a-z]", path.read_text())):
            assert name in known, f"{path.name}: {name} is not in /metrics"
    # One scrape has every worker of the pod: server.workers of the ConfigMap.
    workers = [line for line in pod.metrics().splitlines()
               if line.startswith("duckswap_workers ")]
    assert workers == ["duckswap_workers 2.0"]


def test_the_alert_rules_are_well_formed(pod: Pod) -> None:
    """A Prometheus rule file: named, unique alerts with a duration, a severity and the two
    annotations; each `$labels.X` an annotation prints is a label the alert's series keep;
    the latency thresholds are bucket bounds of their histograms (exact quantiles)."""
    seen = scrape(pod.metrics())
    doc = yaml.safe_load(ALERTS.read_text())
    (group,) = doc["groups"]
    names = [r["alert"] for r in group["rules"]]
    assert len(names) == len(set(names)) >= 6
    for rule in group["rules"]:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        if "for" in rule:
            seconds(rule["for"])
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert set(rule["annotations"]) == {"summary", "description"}
        expr = promql_parser.parse(rule["expr"])
        kept = _kept_labels(expr, seen)
        text = " ".join(rule["annotations"].values())
        for label in re.findall(r"\$labels\.(\w+)", text):
            assert label in kept, f"{rule['alert']}: $labels.{label} is not kept ({kept})"
        if isinstance(expr, promql_parser.BinaryExpr) and isinstance(
                expr.lhs, promql_parser.Call) and expr.lhs.func.name == "histogram_quantile":
            assert isinstance(expr.rhs, promql_parser.NumberLiteral)
            (bucket,) = set(_metrics_under(expr.lhs))
            bounds = {float(b) for b in seen.values[(bucket, "le")]}
            assert expr.rhs.val in bounds, (rule["alert"], expr.rhs.val, sorted(bounds))


def _kept_labels(node: Any, seen: Scrape) -> set[str]:
    """The labels of the series an expression returns (as far as these rules need)."""
    if isinstance(node, promql_parser.AggregateExpr):
        assert node.modifier.type == promql_parser.AggModifierType.By, node
        return set(node.modifier.labels)
    if isinstance(node, promql_parser.Call):
        if node.func.name == "histogram_quantile":
            return _kept_labels(node.args[1], seen) - {"le"}
        return _kept_labels(node.args[-1], seen)
    if isinstance(node, promql_parser.BinaryExpr):
        side = node.rhs if isinstance(node.lhs, promql_parser.NumberLiteral) else node.lhs
        return _kept_labels(side, seen)
    if isinstance(node, promql_parser.ParenExpr):
        return _kept_labels(node.expr, seen)
    if isinstance(node, promql_parser.MatrixSelector):
        return _kept_labels(node.vector_selector, seen)
    if isinstance(node, promql_parser.VectorSelector):
        return seen.labels.get(node.name, set()) | TARGET_LABELS
    raise AssertionError(f"not handled: {node}")


def test_the_dashboard_is_importable() -> None:
    """Grafana's import format: the Prometheus data source as an input, every panel and
    query on it, unique ids, panels within the 24-column grid."""
    dashboard = json.loads(DASHBOARD.read_text())
    (ds_input,) = dashboard["__inputs"]
    assert ds_input["name"] == "DS_PROMETHEUS" and ds_input["type"] == "datasource"
    assert ds_input["pluginId"] == "prometheus"
    assert 36 <= dashboard["schemaVersion"] <= 41 and dashboard["id"] is None
    assert dashboard["uid"] and dashboard["title"]
    source = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 10
    for p in graphs:
        assert p["datasource"] == source, p["title"]
        assert p["targets"] and all(t["datasource"] == source for t in p["targets"])
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, p["title"]
    variables = dashboard["templating"]["list"]
    # provisioned from a file (no import to fill the input), a variable of that name does
    assert variables[0]["name"] == "DS_PROMETHEUS" and variables[0]["type"] == "datasource"
    assert variables[0]["query"] == "prometheus"
    for var in variables[1:]:
        assert var["datasource"] == source


def _docker_engine() -> bool:
    """Whether a Docker engine answers here (the CI machines have none: only a client, or
    nothing; nothing else in this file needs one)."""
    if shutil.which("docker") is None:
        return False
    done = subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False)
    return done.returncode == 0


@pytest.mark.timeout(1200)
@pytest.mark.skipif(not _docker_engine(), reason="no Docker engine answers `docker info` here: "
                    "the image is built and run by this test where one does")
def test_the_image_builds_serves_the_demo_and_stops_on_sigterm(tmp_path: Path) -> None:
    """Where Docker runs: `docker build`, then `docker run` serves the demo (ready, healthy by
    its own HEALTHCHECK), and `docker stop` ends it with exit code 0 within the grace."""
    tag = f"duckswap-test:{os.getpid()}"
    subprocess.run(["docker", "build", "-t", tag, str(REPO)], check=True, timeout=900)
    port = free_port()
    name = f"duckswap-test-{os.getpid()}"
    subprocess.run(["docker", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8080",
                    tag], check=True, capture_output=True, timeout=60)
    try:
        deadline = time.monotonic() + 300

        def ready() -> bool:  # refused, or reset by docker's proxy, until the server listens
            try:
                return get(f"http://127.0.0.1:{port}/readyz")[0] == 200
            except (OSError, http.client.HTTPException):
                return False

        while not ready():
            assert time.monotonic() < deadline, "the container's server never became ready"
            time.sleep(0.5)

        def health() -> str:
            out = subprocess.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", name],
                                 capture_output=True, text=True, check=True, timeout=30)
            return out.stdout.strip()

        while health() != "healthy":
            assert time.monotonic() < deadline, health()
            time.sleep(0.5)
        subprocess.run(["docker", "stop", "-t", "30", name], check=True, capture_output=True,
                       timeout=60)
        code = subprocess.run(["docker", "inspect", "-f", "{{.State.ExitCode}}", name],
                              capture_output=True, text=True, check=True, timeout=30)
        assert code.stdout.strip() == "0"
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, check=False)
