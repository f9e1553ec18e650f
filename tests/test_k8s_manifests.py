"""The kustomize base in k8s/ against the Kubernetes API models of kubernetes-asyncio.

Every object is walked against the OpenAPI model of its kind (`openapi_types` / `attribute_map`
of the generated client): an unknown field, a value of the wrong JSON type or a missing required
field fails. Not checked, as the generated client does not know them: enum values, quantity and
label syntax. The group and version are checked by asking the client's API class for that group
and version whether it can create the kind in a namespace.
k8s/crds/ (the CRDs of the gateway's own kinds) is applied on its own and is not checked here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from kubernetes_asyncio import client

K8S = Path(__file__).resolve().parent.parent / "k8s"
SELECTOR = {"app.kubernetes.io/name": "sandgate", "app.kubernetes.io/component": "gateway"}


def _kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _objects() -> list[tuple[str, dict]]:
    return [
        (f"{name}#{i}", doc)
        for name in _kustomization()["resources"]
        for i, doc in enumerate(yaml.safe_load_all((K8S / name).read_text()))
        if doc is not None
    ]


def _one(kind: str, name: str | None = None) -> dict:
    found = [doc for _, doc in _objects() if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# --- the model walk -------------------------------------------------------------------------

_PRIMITIVES = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "datetime": lambda v: isinstance(v, str),
    "object": lambda v: True,  # int-or-string and free-form fields
}


def model_errors(value, type_name: str, path: str = "") -> list[str]:
    if type_name.startswith("list["):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, item in enumerate(value) for e in model_errors(item, type_name[5:-1], f"{path}[{i}]")]
    if type_name.startswith("dict("):
        if not isinstance(value, dict):
            return [f"{path}: expected a map"]
        inner = re.fullmatch(r"dict\(([^,]*), (.*)\)", type_name).group(2)
        return [e for k, v in value.items() for e in model_errors(v, inner, f"{path}.{k}")]
    if type_name in _PRIMITIVES:
        return [] if _PRIMITIVES[type_name](value) else [f"{path}: expected {type_name}, got {value!r}"]
    model = getattr(client, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} object"]
    by_json = {json_name: attr for attr, json_name in model.attribute_map.items()}
    errors = [f"{path}.{key}: unknown field of {type_name}" for key in value if key not in by_json]
    for key, item in value.items():
        if key in by_json:
            errors += model_errors(item, model.openapi_types[by_json[key]], f"{path}.{key}")
    try:  # the generated setters refuse a missing required field
        model(**{by_json[key]: item for key, item in value.items() if key in by_json})
    except ValueError as exc:
        errors.append(f"{path}: {exc}")
    return errors


def _api_class(api_version: str):
    group, _, version = api_version.rpartition("/")
    words = re.split(r"[.-]", group.removesuffix(".k8s.io")) if group else ["core"]
    return getattr(client, "".join(w.capitalize() for w in words) + version.capitalize() + "Api", None)


def _snake(kind: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", kind).lower()


def test_model_walk_catches_what_an_api_server_would_refuse():
    # The checker itself: each of these is a real mistake, each must be reported.
    assert model_errors({"containers": [{"name": "a", "imagePullPolicy": "Always"}]}, "V1PodSpec") == []
    assert model_errors({"containers": [{"name": "a", "iamge": "x"}]}, "V1PodSpec")  # typo'd field
    assert model_errors({"containers": [{"image": "x"}]}, "V1PodSpec")  # name is required
    assert model_errors({"containers": [{"name": "a", "ports": [{"containerPort": "80"}]}]}, "V1PodSpec")
    assert model_errors({"containers": {"name": "a"}}, "V1PodSpec")  # a map where a list belongs
    assert model_errors({"replicas": True, "selector": {}, "template": {}}, "V1DeploymentSpec")
    assert _api_class("apps/v1") is client.AppsV1Api
    assert _api_class("v1") is client.CoreV1Api
    assert _api_class("rbac.authorization.k8s.io/v1") is client.RbacAuthorizationV1Api


# --- every manifest -------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_in_the_base():
    kustomization = _kustomization()
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(on_disk)


@pytest.mark.parametrize(("where", "doc"), _objects(), ids=[where for where, _ in _objects()])
def test_manifest_validates_against_the_kubernetes_models(where, doc):
    api_version, kind = doc["apiVersion"], doc["kind"]
    api = _api_class(api_version)
    assert api is not None and hasattr(api, f"create_namespaced_{_snake(kind)}"), f"{api_version} {kind}"
    model_name = api_version.rpartition("/")[2].capitalize() + kind
    assert model_errors(doc, model_name) == []
    # A namespace-less base: the overlay chooses the namespace.
    assert "namespace" not in doc["metadata"]
    assert doc["metadata"]["labels"] == SELECTOR


# --- what SPEC 7 asks of them ---------------------------------------------------------------


def test_deployment_runs_hardened_with_probes_on_the_admin_port():
    deployment = _one("Deployment", "sandgate")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] >= 2
    assert spec["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"] == SELECTOR
    assert pod["serviceAccountName"] == _one("ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsUser"] == 1000
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    admin = next(p for p in container["ports"] if p["name"] == "admin")
    assert admin["containerPort"] == 9901
    assert container["args"][container["args"].index("--admin") + 1] == "0.0.0.0:9901"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert 0 < sleep < pod["terminationGracePeriodSeconds"] - 30  # room left for the drain
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} >= {"kubernetes.io/hostname"}
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/tmp" in mounted  # the one writable path under a read-only root
    assert container["resources"]["requests"]["cpu"]  # the HPA's utilisation needs a request


def test_deployment_ships_a_connection_limit_the_gateway_accepts_and_memory_can_hold():
    """The base caps open client connections per pod (`--connection-limit`, the default when no
    ClientTrafficPolicy sets one); the pod's memory limit holds that many request heads of the
    default 64 KiB header limit."""
    from gateway.cli import build_parser

    (container,) = _one("Deployment", "sandgate")["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(container["args"])
    assert args.connection_limit and args.connection_limit > 0
    memory = container["resources"]["limits"]["memory"]
    assert memory.endswith("Mi")
    assert args.connection_limit * 64 * 1024 < int(memory[:-2]) * 1024 * 1024


def test_service_exposes_http_and_metrics_on_the_pods():
    service = _one("Service", "sandgate")
    assert service["spec"]["selector"] == SELECTOR
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"http": (80, "http"), "metrics": (9901, "admin")}
    (container,) = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8080, "admin": 9901}


def test_role_grants_exactly_what_the_spec_lists():
    role = _one("Role", "sandgate")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    expected = {
        *((g, r, v) for g, r in (("", "services"), ("gateway.networking.k8s.io", "httproutes"))
          for v in ("get", "list", "watch", "create", "patch", "delete")),
        *(("", "pods", v) for v in ("get", "list")),
        ("", "pods/exec", "create"),
        *(("agents.x-k8s.io", "sandboxes", v) for v in ("get", "list", "watch")),
        *(("extensions.agents.x-k8s.io", "sandboxclaims", v) for v in ("get", "list", "watch")),
    }
    assert granted == expected
    binding = _one("RoleBinding", "sandgate")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sandgate"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "sandgate"}]


def test_network_policies_deny_by_default_and_allow_only_the_needed_paths():
    policies = {doc["metadata"]["name"]: doc["spec"] for _, doc in _objects() if doc["kind"] == "NetworkPolicy"}
    assert all(spec["podSelector"] == {"matchLabels": SELECTOR} for spec in policies.values())
    deny = policies["sandgate-default-deny"]
    assert set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    ingress = policies["sandgate-allow-ingress"]["ingress"]
    public = next(rule for rule in ingress if rule["ports"] == [{"port": 8080, "protocol": "TCP"}])
    assert "from" not in public
    admin = next(rule for rule in ingress if rule["ports"] == [{"port": 9901, "protocol": "TCP"}])
    assert admin["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    egress = policies["sandgate-allow-egress"]["egress"]
    ports = [{(p["port"], p["protocol"]) for p in rule.get("ports", [])} for rule in egress]
    assert {(53, "UDP"), (53, "TCP")} in ports
    assert {(443, "TCP"), (6443, "TCP")} in ports
    namespaces = [peer["namespaceSelector"]["matchLabels"] for rule in egress for peer in rule.get("to", [])]
    assert {"kubernetes.io/metadata.name": "platform"} in namespaces
    assert {"sandgate.dev/sandbox-namespace": "true"} in namespaces


def test_disruption_budget_and_autoscaler_keep_at_least_one_replica_up():
    assert _one("PodDisruptionBudget")["spec"] == {"minAvailable": 1, "selector": {"matchLabels": SELECTOR}}
    hpa = _one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "sandgate"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 10)
    (metric,) = hpa["metrics"]
    assert metric["resource"] == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}
