"""The Kubernetes side of the sandbox and preview measurements: the API double in its own
process (kube_double.py) holding one Ready sandbox whose "pod" is the benchmark's origin, and
the routes and policies of a gateway that reaches it through a SandboxRouter (X-Sandbox-* headers)
or serves previews of it through a PreviewZone."""

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from harness import BENCH_DIR, Bench, BearerToken, checkout_env

NAMESPACE = "sandboxes"  # the SandboxRouter's one namespace: the sandbox and its previews live here
SANDBOX = "bench"
OWNER = "bench"  # the sandbox's owner: BearerToken's `sub`, so that its token may create previews
POD_IP = "127.0.0.1"  # the origin's address (the gateway runs with --allow-loopback-sandboxes)
GATEWAY_NAMESPACE = "platform"
ZONE = "apps.bench.example"
# Previews outlive any run: the reaper never deletes one while it is measured.
PREVIEW_TTL, PREVIEW_TTL_SECONDS = "24h", 86_400
KUBE_READY_TIMEOUT = 300.0  # 10,000 previews: about 10 s of admission in the double


@dataclass(frozen=True)
class KubeWorld:
    """What kube_double.py reports once it serves: its kubeconfig, some preview hosts, and where
    it counts the gateways' lookups of single preview HTTPRoutes; with a watch delay, a second
    kubeconfig whose watches lag by it."""
    kubeconfig: str
    previews: int
    hosts: tuple[str, ...]
    lookups_url: str
    lagging_kubeconfig: str | None = None


def kube_api(bench: Bench, previews: int, origin_port: int, key: str | None = None,
             watch_delay_ms: int = 0) -> KubeWorld:
    """The API double with the bench sandbox and `previews` previews of `origin_port`, on the
    load CPU; one process per `key` (default: per number of previews)."""
    name = key or f"kube-api-{previews}"

    def start() -> KubeWorld:
        workdir = bench.workdir / name
        ready = workdir / "ready.json"
        workdir.mkdir(parents=True)
        bench.procs.start_python(name, [str(BENCH_DIR / "kube_double.py"), f"--workdir={workdir}",
                                        f"--ready-file={ready}", f"--port={origin_port}", f"--previews={previews}",
                                        f"--watch-delay-ms={watch_delay_ms}"],
                                 bench.cpus.load, env=checkout_env())
        bench.procs.wait_ready(name, ready.exists, KUBE_READY_TIMEOUT)
        data = json.loads(ready.read_text())
        return KubeWorld(data["kubeconfig"], data["previews"], tuple(data["hosts"]), data["lookups_url"],
                         data["lagging_kubeconfig"])
    return bench.shared(name, start)


def kube_args(world: KubeWorld, *, lagging: bool = False) -> tuple[str, ...]:
    """`sandgate serve` flags for the double: its kubeconfig (the one whose watches lag), and the
    origin allowed as a pod."""
    kubeconfig = world.lagging_kubeconfig if lagging else world.kubeconfig
    assert kubeconfig, "the double was started without a watch delay"
    return f"--kubeconfig={kubeconfig}", "--allow-loopback-sandboxes"


# --- routes and policies --------------------------------------------------------------------

GATEWAY = {
    "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
    "metadata": {"name": "gw", "namespace": GATEWAY_NAMESPACE},
    "spec": {"gatewayClassName": "sandgate", "listeners": [{"name": "http", "port": 8080, "protocol": "HTTP"}]},
}


def _route(name: str, rules: list[dict], hostnames: list[str] | None = None) -> dict:
    spec: dict = {"parentRefs": [{"name": "gw"}]}
    if hostnames:
        spec["hostnames"] = hostnames
    spec["rules"] = rules
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": GATEWAY_NAMESPACE}, "spec": spec}


def _backend(kind: str, name: str) -> list[dict]:
    return [{"group": "sandgate.dev", "kind": kind, "name": name}]


def _sandbox_route() -> dict:
    """As in the shipped routes.yaml: X-Sandbox-ID (any value) and the gateway's sandbox paths."""
    return _route("sandboxes", [
        {"name": "header-routed", "matches": [{"headers": [{"name": "X-Sandbox-ID", "type": "RegularExpression",
                                                            "value": ".*"}]}],
         "backendRefs": _backend("SandboxRouter", "sandboxes")},
        {"name": "sandbox-api", "matches": [{"path": {"type": "PathPrefix", "value": "/gateway/v1/sandboxes"}}],
         "backendRefs": _backend("SandboxRouter", "sandboxes")},
    ])


def _router(token_file: Path | None) -> dict:
    spec: dict = {"resolution": "Cluster", "allowedNamespaces": [NAMESPACE], "defaultNamespace": NAMESPACE}
    if token_file:
        spec["routerTokenFile"] = str(token_file)
    return {"apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxRouter",
            "metadata": {"name": "sandboxes", "namespace": GATEWAY_NAMESPACE}, "spec": spec}


def _documents(*objects: dict) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)


def sandbox_routes_yaml(token_file: Path) -> str:
    """A SandboxRouter in `routerTokenFile` mode (agent-sandbox compatible: a static bearer
    token, no JWT to verify) behind the header-routed rule, with Cluster resolution."""
    return _documents(GATEWAY, _sandbox_route(), _router(token_file))


def preview_routes_yaml() -> str:
    """The SandboxRouter (JWT through the SecurityPolicy), the preview API on the platform host
    and the zone's wildcard host, as in the shipped routes.yaml."""
    zone = {"apiVersion": "sandgate.dev/v1alpha1", "kind": "PreviewZone",
            "metadata": {"name": "previews", "namespace": GATEWAY_NAMESPACE},
            "spec": {"zone": ZONE, "gatewayRef": {"name": "gw", "namespace": GATEWAY_NAMESPACE},
                     "accessMode": "capability", "idleTTL": PREVIEW_TTL, "maxLifetime": PREVIEW_TTL}}
    api = _route("preview-api", [{"matches": [{"path": {"type": "PathPrefix", "value": "/gateway/v1/previews"}},
                                              {"path": {"type": "PathPrefix", "value": "/gateway/v1/approvals"}}],
                                  "backendRefs": _backend("PreviewZone", "previews")}])
    hosts = _route("preview-hosts", [{"name": "preview", "backendRefs": _backend("PreviewZone", "previews")}],
                   hostnames=[f"*.{ZONE}"])
    return _documents(GATEWAY, _sandbox_route(), _router(None), api, hosts, zone)


def _target(route: str) -> dict:
    return {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": route}


def preview_policies_yaml(bearer: BearerToken) -> str:
    """JWT (inline JWKS with `bearer`'s key) on the sandbox and preview API routes; the owner is
    the SandboxClaim's `sandgate.dev/owner` annotation; previews are created without approval."""
    provider = {"name": "bench", "issuer": bearer.issuer, "audiences": [bearer.audience],
                "localJWKS": {"type": "Inline", "inline": bearer.jwks}}
    security = {"apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "SecurityPolicy",
                "metadata": {"name": "sandbox-jwt", "namespace": GATEWAY_NAMESPACE},
                "spec": {"targetRefs": [_target("sandboxes"), _target("preview-api")],
                         "jwt": {"providers": [provider]}}}
    who = {"apiVersion": "sandgate.dev/v1alpha1", "kind": "SandboxPolicy",
           "metadata": {"name": "who", "namespace": GATEWAY_NAMESPACE},
           "spec": {"targetRefs": [_target("sandboxes"), _target("preview-api"), _target("preview-hosts")],
                    "owner": {"annotation": "sandgate.dev/owner"}, "preview": {"approval": "auto"}}}
    return _documents(security, who)
