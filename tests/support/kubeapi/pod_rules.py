"""What the API server checks and fills in on a Pod beyond its shape: containers, immutable spec."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

from . import field_errors as fe
from . import names
from .field_errors import FieldError

INITIAL_STATUS = {"phase": "Pending", "qosClass": "BestEffort"}
_RESTART_POLICIES = ["Always", "Never", "OnFailure"]
_SPEC_DEFAULTS = {
    "restartPolicy": "Always",
    "terminationGracePeriodSeconds": 30,
    "dnsPolicy": "ClusterFirst",
    "securityContext": {},
    "schedulerName": "default-scheduler",
    "enableServiceLinks": True,
}
_IMMUTABLE_SPEC = (
    "pod updates may not change fields other than `spec.containers[*].image`,"
    "`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` "
    "(only additions to existing tolerations),`spec.terminationGracePeriodSeconds` "
    "(allow it to be set to 1 if it was previously negative)"
)


def _containers(spec: dict) -> list[tuple[str, dict]]:
    return [
        (f"spec.{group}[{index}]", container)
        for group in ("initContainers", "containers")
        for index, container in enumerate(spec.get(group) or [])
    ]


def default(pod: dict, old: dict | None, neighbours: Callable[[], Iterable[dict]]) -> None:
    spec = pod.setdefault("spec", {})
    for key, value in _SPEC_DEFAULTS.items():
        spec.setdefault(key, copy.deepcopy(value))
    for _, container in _containers(spec):
        image = container.get("image", "")
        untagged_or_latest = ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")
        container.setdefault("imagePullPolicy", "Always" if untagged_or_latest else "IfNotPresent")
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("terminationMessagePolicy", "File")
        container.setdefault("resources", {})
        for port in container.get("ports") or []:
            port.setdefault("protocol", "TCP")


def validate(pod: dict, old: dict | None, neighbours: Callable[[], Iterable[dict]]) -> list[FieldError]:
    spec = pod.get("spec", {})
    errors = [] if spec.get("containers") else [fe.required("spec.containers")]
    seen = set()
    for path, container in _containers(spec):
        name = container.get("name", "")
        if not name:
            errors.append(fe.required(f"{path}.name"))
        else:
            errors += [fe.invalid(f"{path}.name", name, m) for m in names.dns1123_label(name)]
            if name in seen:
                errors.append(fe.duplicate(f"{path}.name", name))
            seen.add(name)
        if not container.get("image"):
            errors.append(fe.required(f"{path}.image"))
        for index, port in enumerate(container.get("ports") or []):
            number = port.get("containerPort", 0)
            if not 1 <= number <= 65535:
                detail = "must be between 1 and 65535, inclusive"
                errors.append(fe.invalid(f"{path}.ports[{index}].containerPort", number, detail))
    if spec.get("restartPolicy") not in _RESTART_POLICIES:
        errors.append(fe.not_supported("spec.restartPolicy", spec.get("restartPolicy"), _RESTART_POLICIES))
    if old is not None and _fixed_part(spec) != _fixed_part(old.get("spec", {})):
        errors.append(fe.forbidden("spec", _IMMUTABLE_SPEC))
    return errors


def _fixed_part(spec: dict) -> dict:
    """The spec without what an update may change."""
    fixed = copy.deepcopy(spec)
    for key in ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds"):
        fixed.pop(key, None)
    for _, container in _containers(fixed):
        container.pop("image", None)
    return fixed
