"""Whether a configuration's sandboxes and previews wait for the cluster watch (SPEC §4.1, §6).

Decided once per load: /readyz reads the answer.
"""

from __future__ import annotations

from typing import Callable

from gateway.config.model import Config, PreviewZone, SandboxRouter


def needs_cluster_state(config: Config, secured: Callable[[str, int, str], bool]) -> bool:
    """SPEC §4.1 readiness: whether serving this config waits for the cluster watch. A `DNS`
    SandboxRouter needs no Kubernetes API (the agent-sandbox router has none); `Cluster`
    resolution does, and so does a rule with a SecurityPolicy (its callers' relations to a
    sandbox are read from the watched state), and so do previews. The terminal is not counted:
    without the API it answers 503 by itself, like any backend that cannot be reached."""
    if config.served(PreviewZone):
        return True
    gateways = sorted({listener.gateway for listener in config.listeners})
    for route in config.routes:
        parents = [p.gateway for p in route.parents] or gateways
        for rule in route.rules:
            for choice in rule.backends:
                router = choice.special
                if isinstance(router, SandboxRouter) and (
                        router.resolution == "Cluster" or any(secured(route.key, rule.index, g) for g in parents)):
                    return True
    return False
