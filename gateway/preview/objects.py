"""The Kubernetes objects behind a preview (SPEC §5), and a preview read back from them.

In the sandbox's namespace: a ClusterIP Service `preview-{token}` selecting exactly the
sandbox's pod, and an HTTPRoute `preview-{token}` on the zone's Gateway with the preview host
and one rule to that Service. Both carry the same labels and annotations and are owned by the
Sandbox, so deleting the sandbox deletes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from yarl import URL

from gateway.config.model import PreviewZone
from gateway.kube import HTTPROUTE, SANDBOX
from gateway.preview.tokens import SUFFIX, fingerprint, host_for, is_token, object_name

LABEL_PREVIEW = "sandgate.dev/preview"
LABEL_SANDBOX = "sandgate.dev/sandbox"
OWNER = "sandgate.dev/owner"
PORT = "sandgate.dev/port"
CREATED_AT = "sandgate.dev/created-at"
EXPIRES_AT = "sandgate.dev/expires-at"
MAX_UNTIL = "sandgate.dev/max-until"
SELECTOR = f"{LABEL_PREVIEW}=true"


def rfc3339(moment: datetime) -> str:
    """UTC with milliseconds: short test TTLs must not be rounded away."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_rfc3339(text: str) -> datetime:
    """ValueError for a time without an offset: compared with aware times it would raise later,
    in the reaper, every round."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"no UTC offset: {text!r}")
    return moment


@dataclass(frozen=True, slots=True, eq=False)
class Preview:
    token: str
    namespace: str
    sandbox: str
    port: int
    host: str
    owner: str
    created_at: datetime
    expires_at: datetime
    max_until: datetime
    uid: str = ""  # the HTTPRoute's
    # The Sandbox's uid (its ownerReference): a sandbox re-created under the same name, maybe
    # someone else's, is another sandbox and never this preview's.
    sandbox_uid: str = ""
    # Derived once, read per request: the token's fingerprint, the two limits as epoch seconds.
    fingerprint: str = field(init=False, compare=False)
    expires_ts: float = field(init=False, compare=False)
    max_ts: float = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fingerprint", fingerprint(self.token))
        object.__setattr__(self, "expires_ts", self.expires_at.timestamp())
        object.__setattr__(self, "max_ts", self.max_until.timestamp())

    def as_json(self, origin: str) -> dict:
        return {
            "token": self.token,
            "url": preview_url(self, origin),
            "namespace": self.namespace,
            "sandbox": self.sandbox,
            "port": self.port,
            "owner": self.owner,
            "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.expires_at),
            "max_until": rfc3339(self.max_until),
        }


def preview_url(preview: Preview, origin: str) -> str:
    """The preview's URL with the scheme and port clients reach the gateway on (the public
    origin's): preview hosts are served by the same listeners."""
    url = URL(origin)
    port = "" if url.port is None or url.port == {"http": 80, "https": 443}.get(url.scheme) else f":{url.port}"
    return f"{url.scheme}://{preview.host}{port}/"


def created_view(preview: Preview, origin: str) -> dict:
    """The 201 body of a create (SPEC §5)."""
    full = preview.as_json(origin)
    return {k: full[k] for k in ("token", "url", "expires_at", "max_until")}


def metadata(preview: Preview) -> dict:
    return {
        "name": object_name(preview.token),
        "namespace": preview.namespace,
        "labels": {LABEL_PREVIEW: "true", LABEL_SANDBOX: preview.sandbox},
        "annotations": {
            OWNER: preview.owner,
            PORT: str(preview.port),
            CREATED_AT: rfc3339(preview.created_at),
            EXPIRES_AT: rfc3339(preview.expires_at),
            MAX_UNTIL: rfc3339(preview.max_until),
        },
        "ownerReferences": [{
            "apiVersion": SANDBOX.api_version, "kind": SANDBOX.kind, "name": preview.sandbox, "uid": preview.sandbox_uid,
            "blockOwnerDeletion": False,
        }],
    }


def service(preview: Preview, pod_selector: dict[str, str]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(preview),
        "spec": {
            "type": "ClusterIP",
            "selector": dict(pod_selector),
            "ports": [{"name": "http", "protocol": "TCP", "port": preview.port, "targetPort": preview.port}],
        },
    }


def httproute(preview: Preview, zone: PreviewZone) -> dict:
    parent = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": zone.gateway_name,
              "namespace": zone.gateway_namespace}
    if zone.section_name:
        parent["sectionName"] = zone.section_name
    return {
        "apiVersion": HTTPROUTE.api_version,
        "kind": HTTPROUTE.kind,
        "metadata": metadata(preview),
        "spec": {
            "parentRefs": [parent],
            "hostnames": [preview.host],
            "rules": [{
                "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                "backendRefs": [{"group": "", "kind": "Service", "name": object_name(preview.token), "port": preview.port}],
            }],
        },
    }


def from_httproute(route: dict) -> Preview | None:
    """The preview an HTTPRoute stands for; None for one that is not a well-formed preview
    (whatever its fields hold: anyone who may write HTTPRoutes writes them)."""
    try:
        meta = route.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        labels = meta.get("labels") or {}
        name = meta.get("name", "")
        hosts = (route.get("spec") or {}).get("hostnames") or []
        if labels.get(LABEL_PREVIEW) != "true" or not name.startswith("preview-") or len(hosts) != 1:
            return None
        token, host, port = name[len("preview-"):], hosts[0].lower(), int(annotations[PORT])
        sandbox_uids = [ref.get("uid") for ref in meta.get("ownerReferences") or ()
                        if isinstance(ref, dict) and ref.get("kind") == SANDBOX.kind and ref.get("uid")]
        # the host must be the one its name's token makes: another route could otherwise claim
        # a live preview's host and take its traffic
        if not is_token(token) or not host.startswith(f"{token}{SUFFIX}.") or not 0 < port < 65536 \
                or len(sandbox_uids) != 1 or not isinstance(sandbox_uids[0], str):
            return None
        return Preview(
            token=token,
            namespace=meta.get("namespace", ""),
            sandbox=labels[LABEL_SANDBOX],
            port=port,
            host=host,
            owner=annotations.get(OWNER, ""),
            created_at=parse_rfc3339(annotations[CREATED_AT]),
            expires_at=parse_rfc3339(annotations[EXPIRES_AT]),
            max_until=parse_rfc3339(annotations[MAX_UNTIL]),
            uid=meta.get("uid", ""),
            sandbox_uid=sandbox_uids[0],
        )
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


def new_preview(token: str, namespace: str, sandbox: str, sandbox_uid: str, port: int, owner: str, zone: PreviewZone,
                now: datetime) -> Preview:
    max_until = now + timedelta(seconds=zone.max_lifetime)
    return Preview(
        token=token, namespace=namespace, sandbox=sandbox, sandbox_uid=sandbox_uid, port=port,
        host=host_for(token, zone.zone), owner=owner,
        created_at=now, expires_at=min(now + timedelta(seconds=zone.idle_ttl), max_until), max_until=max_until,
    )
