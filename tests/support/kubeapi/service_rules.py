"""What the API server checks and fills in on a Service beyond its shape: ports, type, cluster IP."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

from . import field_errors as fe
from . import names
from .field_errors import FieldError

INITIAL_STATUS = {"loadBalancer": {}}
SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/12")
NODE_PORTS = range(30000, 32768)
_TYPES = ["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"]
_PROTOCOLS = ["SCTP", "TCP", "UDP"]
_PORT_RANGE = "must be between 1 and 65535, inclusive"

Neighbours = Callable[[], Iterable[dict]]  # every other Service, in all namespaces


def default(service: dict, old: dict | None, neighbours: Neighbours) -> None:
    spec = service.setdefault("spec", {})
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    for port in spec.get("ports") or []:
        port.setdefault("protocol", "TCP")
        if "port" in port:
            port.setdefault("targetPort", port["port"])
    if spec["type"] == "ExternalName":
        return
    old_spec = (old or {}).get("spec", {})
    # A PUT that leaves the allocated IP out keeps it, as the server's update does.
    if not spec.get("clusterIP") and old_spec.get("clusterIP"):
        spec["clusterIP"], spec["clusterIPs"] = old_spec["clusterIP"], old_spec.get("clusterIPs")
    if not spec.get("clusterIP"):
        spec["clusterIP"] = _free_cluster_ip(neighbours)
    spec.setdefault("clusterIPs", [spec["clusterIP"]])
    if spec["clusterIP"] != "None":
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
    spec.setdefault("internalTrafficPolicy", "Cluster")
    if spec["type"] in ("NodePort", "LoadBalancer"):
        spec.setdefault("externalTrafficPolicy", "Cluster")
        taken = {p.get("nodePort") for s in neighbours() for p in s["spec"].get("ports") or []}
        for port in spec.get("ports") or []:
            if "nodePort" not in port:
                port["nodePort"] = next(p for p in NODE_PORTS if p not in taken)
                taken.add(port["nodePort"])


def _free_cluster_ip(neighbours: Neighbours) -> str:
    taken = {s["spec"].get("clusterIP") for s in neighbours()}
    # .1 is the `kubernetes` Service and .10 cluster DNS in a real cluster: start after them.
    return next(str(ip) for ip in SERVICE_CIDR.hosts() if int(ip) - int(SERVICE_CIDR[0]) > 10 and str(ip) not in taken)


def validate(service: dict, old: dict | None, neighbours: Neighbours) -> list[FieldError]:
    spec = service.get("spec", {})
    errors = []
    if spec.get("type") not in _TYPES:
        errors.append(fe.not_supported("spec.type", spec.get("type"), _TYPES))
    ports = spec.get("ports") or []
    if not ports and spec.get("type") != "ExternalName":
        errors.append(fe.required("spec.ports"))
    if spec.get("type") == "ExternalName" and not spec.get("externalName"):
        errors.append(fe.required("spec.externalName"))
    errors += _ports(ports)
    errors += _cluster_ip(spec, old, neighbours)
    for key, value in (spec.get("selector") or {}).items():
        errors += [fe.invalid("spec.selector", key, m) for m in names.qualified_name(key)]
        errors += [fe.invalid("spec.selector", value, m) for m in names.label_value(value)]
    return errors


def _ports(ports: list[dict]) -> list[FieldError]:
    errors, seen_names, seen_ports = [], set(), set()
    for index, port in enumerate(ports):
        path = f"spec.ports[{index}]"
        name = port.get("name", "")
        if not name and len(ports) > 1:
            errors.append(fe.required(f"{path}.name"))
        elif name:
            errors += [fe.invalid(f"{path}.name", name, m) for m in names.dns1123_label(name)]
            if name in seen_names:
                errors.append(fe.duplicate(f"{path}.name", name))
            seen_names.add(name)
        number = port.get("port", 0)
        if not 1 <= number <= 65535:
            errors.append(fe.invalid(f"{path}.port", number, _PORT_RANGE))
        protocol = port.get("protocol")
        if protocol not in _PROTOCOLS:
            errors.append(fe.not_supported(f"{path}.protocol", protocol, _PROTOCOLS))
        if (number, protocol) in seen_ports:
            errors.append(fe.duplicate(path, {"port": number, "protocol": protocol}))
        seen_ports.add((number, protocol))
        errors += _target_port(port.get("targetPort"), f"{path}.targetPort")
        node_port = port.get("nodePort")
        if node_port is not None and node_port not in NODE_PORTS:
            detail = "provided port is not in the valid range. The range of valid ports is 30000-32767"
            errors.append(fe.invalid(f"{path}.nodePort", node_port, detail))
    return errors


def _target_port(target: object, path: str) -> list[FieldError]:
    if isinstance(target, bool) or not isinstance(target, (int, str)):
        return [fe.invalid(path, target, "must be an integer or a port name")]
    if isinstance(target, int):
        return [] if 1 <= target <= 65535 else [fe.invalid(path, target, _PORT_RANGE)]
    return [fe.invalid(path, target, m) for m in names.iana_service_name(target)]


def _cluster_ip(spec: dict, old: dict | None, neighbours: Neighbours) -> list[FieldError]:
    ip = spec.get("clusterIP")
    if spec.get("type") == "ExternalName" or ip in (None, "", "None"):
        return []
    old_ip = (old or {}).get("spec", {}).get("clusterIP")
    if old_ip:
        return [] if ip == old_ip else [fe.invalid("spec.clusterIP", ip, "field is immutable")]
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return [fe.invalid("spec.clusterIPs[0]", ip, "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)")]
    if address not in SERVICE_CIDR:
        why = f"the provided IP ({ip}) is not in the valid range. The range of valid IPs is {SERVICE_CIDR}"
        return [fe.invalid("spec.clusterIPs", [ip], f"failed to allocate IP {ip}: {why}")]
    if any(s["spec"].get("clusterIP") == ip for s in neighbours()):
        return [fe.invalid("spec.clusterIPs", [ip], f"failed to allocate IP {ip}: provided IP is already allocated")]
    return []
