"""A Kubernetes API server test double for the real kubernetes-asyncio client.

    async with running_kube_api(tmp_path) as api:
        async with await api.client() as client:
            ...

It validates what it receives against the CRDs in gateway/schemas (and the client's own models
for Services and Pods), keeps resourceVersions, history for watches and owner references, and
runs pod exec as real local processes. Modules, one job each:

    double.py      KubeApi and running_kube_api: lifecycle, arranging state, fault injection
    server.py      the aiohttp app: request log, Status errors, authentication, HTTP verbs
    paths.py       URL -> resource path (pure)        discovery.py  /api, /apis, /version
    registry.py    verb semantics: metadata, generation, /status, conflicts, finalizers, GC
    store.py       objects, resourceVersions, event history, watch subscriptions
    watch.py       watch streams                      selectors.py  label/field selectors
    validation.py  admission order: decode, default, validate
    schema.py      CRD structural schemas             typed.py      built-ins vs client models
    metadata_rules.py, service_rules.py, pod_rules.py, names.py   the server's own checks
    patch.py       merge, strategic (maps), JSON patch
    exec.py        pod exec sessions                  channels.py   channel.k8s.io framing
    process.py     local processes in a pty or on pipes
    status.py, field_errors.py   metav1.Status bodies and their causes
"""

from .double import KubeApi, running_kube_api
from .status import ApiError

__all__ = ["ApiError", "KubeApi", "running_kube_api"]
