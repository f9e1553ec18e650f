import copy
from pathlib import Path

import yaml

from gateway.config import schemas
from gateway.config.schemas import SchemaError, known_kinds, validate

REPO = Path(__file__).resolve().parent.parent


def by_path(errors: list[SchemaError]) -> dict[tuple, str]:
    assert all(isinstance(e, SchemaError) for e in errors)
    return {e.json_path: e.message for e in errors}


def httproute() -> dict:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "api", "namespace": "infra", "labels": {"app": "api"}},
        "spec": {
            "parentRefs": [{"name": "gw", "sectionName": "http"}],
            "hostnames": ["api.example.com", "*.example.com"],
            "rules": [{
                "name": "api",
                "matches": [{"path": {"type": "PathPrefix", "value": "/api"}},
                            {"headers": [{"name": "x-version", "value": "2"}]}],
                "filters": [{"type": "URLRewrite",
                             "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}}],
                "backendRefs": [{"name": "svc", "port": 8080, "weight": 3},
                                {"group": "gateway.envoyproxy.io", "kind": "Backend", "name": "ext"}],
                "timeouts": {"request": "10s", "backendRequest": "5s"},
            }],
        },
    }


VALID = {
    "HTTPRoute": httproute(),
    "Gateway": {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": {"name": "gw"},
        "spec": {"gatewayClassName": "sandgate",
                 "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"},
                               {"name": "previews", "port": 443, "protocol": "HTTPS",
                                "hostname": "*.preview.example.com",
                                "tls": {"certificateRefs": [{"name": "wildcard"}]}}]},
    },
    "Backend": {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "Backend", "metadata": {"name": "ext"},
        "spec": {"endpoints": [{"fqdn": {"hostname": "api.internal", "port": 443}},
                               {"ip": {"address": "10.0.0.1", "port": 80}},
                               {"unix": {"path": "/run/app.sock"}}]},
    },
    "SecurityPolicy": {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "SecurityPolicy", "metadata": {"name": "jwt"},
        "spec": {
            "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "api",
                            "sectionName": "api"}],
            "jwt": {"providers": [{"name": "idp", "issuer": "https://idp.example.com", "audiences": ["gw"],
                                   "remoteJWKS": {"uri": "https://idp.example.com/jwks", "cacheDuration": "300s"},
                                   "claimToHeaders": [{"claim": "sub", "header": "x-sub"}]}]},
            "authorization": {"defaultAction": "Deny",
                              "rules": [{"name": "admins", "action": "Allow",
                                         "principal": {"jwt": {"provider": "idp",
                                                               "claims": [{"name": "groups", "values": ["admin"]}]}}}]},
        },
    },
    "SandboxRouter": {
        "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxRouter", "metadata": {"name": "sandboxes"},
        "spec": {"resolution": "DNS", "clusterDomain": "cluster.local", "allowedNamespaces": ["agents"],
                 "defaultNamespace": "agents", "defaultPort": 8888, "timeout": "180s",
                 "allowUnauthenticated": False, "routerTokenFile": "/var/run/sandgate/token"},
    },
    "PreviewZone": {
        "apiVersion": "sandgate.dev/v1alpha1", "kind": "PreviewZone", "metadata": {"name": "previews"},
        "spec": {"zone": "preview.example.com", "gatewayRef": {"name": "gw", "namespace": "infra"},
                 "accessMode": "owner", "idleTTL": "30m", "maxLifetime": "8h", "approvalWindow": "5m"},
    },
    "SandboxPolicy": {
        "apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxPolicy", "metadata": {"name": "owners"},
        "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"}],
                 "owner": {"label": "sandgate.dev/owner"}, "adminGroups": ["admins"],
                 "preview": {"ports": {"min": 1024, "max": 65535}, "maxPerSandbox": 3, "maxTotal": 50,
                             "approval": "manual"}},
    },
}


def test_valid_objects_pass():
    for kind, obj in VALID.items():
        assert validate(obj) == [], kind


def test_port_out_of_range():
    route = httproute()
    route["spec"]["rules"][0]["backendRefs"][0]["port"] = 70000
    assert validate(route) == [SchemaError(
        ("spec", "rules", 0, "backendRefs", 0, "port"),
        "spec.rules[0].backendRefs[0].port: 70000 is greater than the maximum of 65535")]


def test_bad_path_match_type():
    route = httproute()
    route["spec"]["rules"][0]["matches"][0]["path"]["type"] = "Regex"
    (error,) = validate(route)
    assert error.json_path == ("spec", "rules", 0, "matches", 0, "path", "type")
    assert error.message == ('spec.rules[0].matches[0].path.type: "Regex" is not one of '
                             '"Exact", "PathPrefix", "RegularExpression"')


def test_unknown_fields_are_reported_one_by_one():
    route = httproute()
    route["spec"]["foo"] = 1
    route["spec"]["rules"][0]["backendRefs"][0]["weigth"] = 2
    route["extra"] = True
    assert by_path(validate(route)) == {
        ("extra",): "unknown field extra",
        ("spec", "foo"): "unknown field spec.foo",
        ("spec", "rules", 0, "backendRefs", 0, "weigth"): "unknown field spec.rules[0].backendRefs[0].weigth",
    }


def test_wrong_types():
    route = httproute()
    route["spec"]["hostnames"] = "api.example.com"
    route["spec"]["rules"][0]["backendRefs"][0]["port"] = "8080"
    route["spec"]["rules"][0]["backendRefs"][0]["weight"] = True
    assert by_path(validate(route)) == {
        ("spec", "hostnames"): "spec.hostnames: expected array, got string",
        ("spec", "rules", 0, "backendRefs", 0, "port"): "spec.rules[0].backendRefs[0].port: expected integer, got string",
        ("spec", "rules", 0, "backendRefs", 0, "weight"): "spec.rules[0].backendRefs[0].weight: expected integer, got boolean",
    }


def test_missing_required_fields_point_at_the_missing_field():
    route = httproute()
    del route["spec"]["rules"][0]["backendRefs"][1]["name"]
    del route["spec"]["parentRefs"][0]["name"]
    assert by_path(validate(route)) == {
        ("spec", "parentRefs", 0, "name"): "missing required field spec.parentRefs[0].name",
        ("spec", "rules", 0, "backendRefs", 1, "name"): "missing required field spec.rules[0].backendRefs[1].name",
    }
    zone = copy.deepcopy(VALID["PreviewZone"])
    del zone["spec"]["zone"]
    assert by_path(validate(zone)) == {("spec", "zone"): "missing required field spec.zone"}


def test_hostname_pattern_violations():
    route = httproute()
    route["spec"]["hostnames"] = ["Api.example.com", "api.example.com.", "10.0.0.1:80", "foo.*.com"]
    errors = validate(route)
    assert [e.json_path for e in errors] == [("spec", "hostnames", i) for i in range(4)]
    assert errors[0].message.startswith('spec.hostnames[0]: "Api.example.com" does not match ^(\\*\\.)?[a-z0-9]')


def test_duration_pattern():
    route = httproute()
    route["spec"]["rules"][0]["timeouts"]["request"] = "10 seconds"
    zone = copy.deepcopy(VALID["PreviewZone"])
    zone["spec"]["idleTTL"] = "1d"
    assert [e.json_path for e in validate(route)] == [("spec", "rules", 0, "timeouts", "request")]
    assert [e.json_path for e in validate(zone)] == [("spec", "idleTTL")]


def test_sandgate_kinds_reject_bad_values():
    router = copy.deepcopy(VALID["SandboxRouter"])
    router["spec"].update(resolution="Pod", defaultPort=0, allowedNamespaces=["Agents"])
    policy = copy.deepcopy(VALID["SandboxPolicy"])
    policy["spec"]["preview"]["approval"] = "never"
    policy["spec"]["preview"]["ports"]["max"] = 70000
    assert sorted(by_path(validate(router))) == [
        ("spec", "allowedNamespaces", 0), ("spec", "defaultPort"), ("spec", "resolution")]
    assert sorted(by_path(validate(policy))) == [
        ("spec", "preview", "approval"), ("spec", "preview", "ports", "max")]


def test_duplicate_list_map_entries():
    gateway = copy.deepcopy(VALID["Gateway"])
    gateway["spec"]["listeners"][1]["name"] = "http"
    assert validate(gateway) == [SchemaError(("spec", "listeners", 1),
                                             'spec.listeners[1]: duplicate entry for name="http"')]


def test_int_or_string_fields_take_both():
    policy = {"apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "ClientTrafficPolicy",
              "metadata": {"name": "limits"},
              "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"}],
                       "connection": {"bufferLimit": "32Ki"}}}
    assert validate(policy) == []
    policy["spec"]["connection"]["bufferLimit"] = 32768
    assert validate(policy) == []
    policy["spec"]["connection"]["bufferLimit"] = True
    assert by_path(validate(policy)) == {
        ("spec", "connection", "bufferLimit"): "spec.connection.bufferLimit: expected integer or string, got boolean"}


def test_preserve_unknown_fields_keeps_anything():
    policy = {"apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "BackendTrafficPolicy",
              "metadata": {"name": "lb"},
              "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "api"}],
                       "loadBalancer": {"type": "DynamicModule",
                                        "dynamicModule": {"name": "mod", "lbPolicyName": "p",
                                                          "config": {"any": {"thing": [1, "x"]}}}}}}
    assert validate(policy) == []
    policy["spec"]["loadBalancer"]["dynamicModule"]["other"] = 1
    assert [e.message for e in validate(policy)] == ["unknown field spec.loadBalancer.dynamicModule.other"]


def test_nullable_allows_null():
    converted = schemas._to_json_schema(
        {"type": "object", "properties": {"a": {"type": "string", "nullable": True, "enum": ["x"]}}})
    assert converted == {"type": "object", "additionalProperties": False,
                         "properties": {"a": {"type": ["string", "null"], "enum": ["x", None]}}}


def test_metadata_checks():
    route = httproute()
    route["metadata"] = {"name": "API_v1", "namespace": "Infra", "labels": {"owner": "alice@example.com"},
                         "annotations": {"sandgate.dev/owner": "alice@example.com", "bad key": "x",
                                         "sandgate.dev/port": 8080}}
    assert sorted(by_path(validate(route))) == [
        ("metadata", "annotations", "bad key"),
        ("metadata", "annotations", "sandgate.dev/port"),
        ("metadata", "labels", "owner"),
        ("metadata", "name"),
        ("metadata", "namespace"),
    ]
    route["metadata"] = {"namespace": "infra"}
    assert by_path(validate(route)) == {("metadata", "name"): "missing required field metadata.name"}
    route["metadata"] = {"generateName": "preview-"}
    assert validate(route) == []
    route["metadata"] = {"name": "a" * 254}
    assert [e.json_path for e in validate(route)] == [("metadata", "name")]


def test_annotation_paths_are_quoted():
    route = httproute()
    route["metadata"]["annotations"] = {"sandgate.dev/port": 8080}
    (error,) = validate(route)
    assert error.message == 'metadata.annotations["sandgate.dev/port"]: expected string, got integer'


def test_unknown_kind_and_version():
    assert validate({"apiVersion": "x/y", "kind": "Foo", "metadata": {"name": "a"}}) == [
        SchemaError(("kind",), "unknown kind Foo (apiVersion x/y)")]
    route = httproute()
    route["apiVersion"] = "gateway.networking.k8s.io/v2"
    assert validate(route) == [
        SchemaError(("kind",), "unknown kind HTTPRoute (apiVersion gateway.networking.k8s.io/v2)")]
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc"}}
    assert [e.json_path for e in validate(service)] == [("kind",)]


def test_missing_type_meta():
    assert by_path(validate({"metadata": {"name": "a"}})) == {
        ("apiVersion",): "missing required field apiVersion", ("kind",): "missing required field kind"}
    assert validate([]) == [SchemaError((), "object is not a mapping")]


def test_served_older_versions_validate_too():
    route = httproute()
    route["apiVersion"] = "gateway.networking.k8s.io/v1beta1"
    assert validate(route) == []


def test_known_kinds():
    kinds = known_kinds()
    assert {
        ("gateway.networking.k8s.io/v1", "HTTPRoute"),
        ("gateway.networking.k8s.io/v1", "Gateway"),
        ("gateway.networking.k8s.io/v1beta1", "ReferenceGrant"),
        ("gateway.envoyproxy.io/v1alpha1", "Backend"),
        ("gateway.envoyproxy.io/v1alpha1", "SecurityPolicy"),
        ("agents.x-k8s.io/v1beta1", "Sandbox"),
        ("extensions.agents.x-k8s.io/v1beta1", "SandboxClaim"),
        ("sandgate.dev/v1alpha1", "SandboxRouter"),
        ("sandgate.dev/v1alpha1", "PreviewZone"),
        ("sandgate.dev/v1alpha1", "SandboxPolicy"),
    } <= kinds
    assert ("gateway.networking.k8s.io/v1alpha2", "HTTPRoute") not in kinds


def test_format_path():
    assert schemas.format_path(("spec", "rules", 0, "name")) == "spec.rules[0].name"
    assert schemas.format_path(("metadata", "labels", "a.b/c")) == 'metadata.labels["a.b/c"]'
    assert schemas.format_path(()) == "(root)"


def test_sandgate_crds_are_vendored_unchanged():
    names = sorted(p.name for p in (REPO / "k8s" / "crds").glob("sandgate.dev_*.yaml"))
    assert names == ["sandgate.dev_previewzones.yaml", "sandgate.dev_sandboxpolicies.yaml",
                     "sandgate.dev_sandboxrouters.yaml"]
    for name in names:
        assert (REPO / "k8s" / "crds" / name).read_bytes() == \
            (REPO / "gateway" / "schemas" / "sandgate" / name).read_bytes(), name


def test_sandgate_crds_are_structural():
    def untyped(node: dict, where: str):
        if not (node.get("type") or node.get("x-kubernetes-int-or-string")
                or node.get("x-kubernetes-preserve-unknown-fields")):
            yield where
        if not node.get("description") and where.count(".") > 1 and "type" in node and node["type"] == "object":
            yield where + " (no description)"
        for name, sub in node.get("properties", {}).items():
            yield from untyped(sub, f"{where}.{name}")
        if isinstance(node.get("items"), dict):
            yield from untyped(node["items"], where + "[]")

    for path in sorted((REPO / "k8s" / "crds").glob("sandgate.dev_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
        assert crd["kind"] == "CustomResourceDefinition"
        spec = crd["spec"]
        assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}" == \
            f"{spec['names']['plural']}.sandgate.dev"
        assert spec["scope"] == "Namespaced"
        (version,) = spec["versions"]
        assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
        schema = version["schema"]["openAPIV3Schema"]
        assert list(untyped(schema, "")) == [], path.name
        assert schema["properties"]["metadata"] == {"type": "object"}
