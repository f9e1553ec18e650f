"""The frozen route table: compiled once per configuration, matched per request.

Lookup never loops over all routes. A request's port picks the listeners; its Host picks one
listener and then a precomputed tuple of *host tiers* (exact host, then each matching wildcard,
longest first, then routes without hostnames) by dictionary. Inside a tier, exact paths are a
dictionary lookup, path prefixes are found by walking the request path's own element prefixes
(one lookup each, longest first) and only regular-expression matches are scanned.

Precedence (Gateway API v1; RegularExpression placement follows Envoy Gateway):
host specificity > Exact path > RegularExpression (longest first) > PathPrefix (longest first)
> method given > more header matches > more query matches > oldest route > route
namespace/name > rule order > match order. A tier with no matching rule falls through to the
next tier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Iterable, Mapping, TypeVar
from urllib.parse import parse_qsl

from gateway.config.model import Config, Listener, Route, RouteMatch, Rule
from gateway.routing.attach import ANY_HOST, attachments
from gateway.routing.backends import BackendPicker
from gateway.routing.paths import host_suffixes

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Candidate:
    """One (route, rule, match) a request can land on, with its precedence key."""

    listener: Listener
    route: Route
    rule: Rule
    match: RouteMatch
    match_index: int
    host: str  # the effective hostname it was compiled under ("" = any)
    backends: BackendPicker

    @property
    def matched_prefix(self) -> str | None:
        return self.match.path.value if self.match.path.kind == "PathPrefix" else None

    def tie_key(self) -> tuple:
        m = self.match
        return (
            m.method is None,
            -len(m.headers),
            -len(m.query),
            self.route.order,
            self.route.key,
            self.rule.index,
            self.match_index,
        )


class HostMap(Generic[T]):
    """Exact hostnames by dictionary, then wildcards most specific first, then a default."""

    __slots__ = ("exact", "wildcard", "default")

    def __init__(self, exact: dict[str, T], wildcard: dict[str, T], default: T | None):
        self.exact = exact
        self.wildcard = wildcard
        self.default = default

    def lookup(self, host: str) -> T | None:
        found = self.exact.get(host)
        if found is not None:
            return found
        if self.wildcard:
            for key in host_suffixes(host):
                found = self.wildcard.get(key)
                if found is not None:
                    return found
        return self.default


class Tier:
    """The candidates of one hostname, indexed by path."""

    __slots__ = ("exact", "regex", "prefix")

    def __init__(self, candidates: Iterable[Candidate]):
        exact: dict[str, list[Candidate]] = {}
        regex: list[Candidate] = []
        prefix: dict[str, list[Candidate]] = {}
        for c in candidates:
            path = c.match.path
            if path.kind == "Exact":
                exact.setdefault(path.value, []).append(c)
            elif path.kind == "RegularExpression":
                regex.append(c)
            else:
                prefix.setdefault(path.value.rstrip("/"), []).append(c)
        self.exact = {k: tuple(sorted(v, key=Candidate.tie_key)) for k, v in exact.items()}
        self.regex = tuple(sorted(regex, key=lambda c: (-len(c.match.path.value), c.tie_key())))
        self.prefix = {
            k: tuple(sorted(v, key=lambda c: (-len(c.match.path.value), c.tie_key())))
            for k, v in prefix.items()
        }

    def find(self, method: str, path: str, request: "RequestView") -> Candidate | None:
        bucket = self.exact.get(path)
        if bucket is not None:
            found = _first_accepting(bucket, method, request)
            if found is not None:
                return found
        for c in self.regex:
            if c.match.path.pattern.fullmatch(path) and _accepts(c.match, method, request):
                return c
        if self.prefix:
            key = path.rstrip("/")
            while True:
                bucket = self.prefix.get(key)
                if bucket is not None:
                    found = _first_accepting(bucket, method, request)
                    if found is not None:
                        return found
                if not key:
                    return None
                key = key[: key.rfind("/")]
        return None

    def __len__(self) -> int:
        return sum(map(len, self.exact.values())) + len(self.regex) + sum(map(len, self.prefix.values()))

    def ordered(self) -> list[Candidate]:
        """All candidates in precedence order (for `sandgate routes`)."""
        out = [c for k in sorted(self.exact) for c in self.exact[k]]
        out += list(self.regex)
        for key in sorted(self.prefix, key=lambda k: -len(k)):
            out += list(self.prefix[key])
        return out


class RequestView:
    """What matching may look at besides method and path; the query is parsed only if needed."""

    __slots__ = ("headers", "raw_query", "_query")

    def __init__(self, headers: Mapping[str, str], raw_query: str):
        self.headers = headers  # case-insensitive multidict
        self.raw_query = raw_query
        self._query: dict[str, str] | None = None

    def header(self, name: str) -> str | None:
        values = self.headers.getall(name, None)
        if not values:
            return None
        return values[0] if len(values) == 1 else ",".join(values)

    def query(self, name: str) -> str | None:
        if self._query is None:
            self._query = {}
            for key, value in parse_qsl(self.raw_query, keep_blank_values=True):
                self._query.setdefault(key, value)  # only the first value of a repeated name
        return self._query.get(name)


def _accepts(match: RouteMatch, method: str, request: RequestView) -> bool:
    if match.method is not None and match.method != method:
        return False
    for h in match.headers:
        actual = request.header(h.name)
        if actual is None or not h.accepts(actual):
            return False
    for q in match.query:
        actual = request.query(q.name)
        if actual is None or not q.accepts(actual):
            return False
    return True


def _first_accepting(bucket: tuple[Candidate, ...], method: str, request: RequestView) -> Candidate | None:
    for c in bucket:
        m = c.match
        if m.method is None and not m.headers and not m.query:
            return c
        if _accepts(m, method, request):
            return c
    return None


@dataclass(frozen=True, slots=True)
class ListenerRoutes:
    listener: Listener
    hosts: HostMap[tuple[Tier, ...]]

    def find(self, host: str, method: str, path: str, request: RequestView) -> Candidate | None:
        tiers = self.hosts.lookup(host)
        if tiers is None:
            return None
        for tier in tiers:
            found = tier.find(method, path, request)
            if found is not None:
                return found
        return None


class RouteTable:
    """Immutable once built; a reload builds a new one and swaps the reference."""

    def __init__(self, config: Config, ports: dict[int, HostMap[ListenerRoutes]], attached: dict[str, list]):
        self.config = config
        self.ports = ports
        self.attached = attached  # route key -> [(listener, hostnames)]

    def listener_routes(self, port: int, host: str) -> ListenerRoutes | None:
        by_host = self.ports.get(port)
        return by_host.lookup(host) if by_host is not None else None

    def find(self, port: int, host: str, method: str, path: str, request: RequestView) -> Candidate | None:
        routes = self.listener_routes(port, host)
        return routes.find(host, method, path, request) if routes is not None else None

    def ordered_candidates(self) -> list[Candidate]:
        """Every candidate, grouped by listener and host tier, in precedence order."""
        out: list[Candidate] = []
        seen: set[int] = set()
        for port in sorted(self.ports):
            for routes in _host_map_values(self.ports[port]):
                for tiers in _host_map_values(routes.hosts):
                    for tier in tiers:
                        if id(tier) not in seen:
                            seen.add(id(tier))
                            out += tier.ordered()
        return out


def _host_map_values(m: HostMap[T]) -> list[T]:
    values = [m.exact[k] for k in sorted(m.exact)]
    values += [m.wildcard[k] for k in sorted(m.wildcard, key=lambda k: -len(k))]
    if m.default is not None:
        values.append(m.default)
    return values


def compile_table(config: Config) -> RouteTable:
    by_listener: dict[Listener, dict[str, list[Candidate]]] = {l: {} for l in config.listeners}
    attached: dict[str, list] = {}
    picker_cache: dict[str, list[BackendPicker]] = {}

    def pickers(route: Route) -> list[BackendPicker]:
        if route.key not in picker_cache:
            picker_cache[route.key] = [BackendPicker(rule.backends) for rule in route.rules]
        return picker_cache[route.key]

    for route in config.routes:
        found = attachments(route, config.listeners)
        attached[route.key] = found
        for listener, hosts in found:
            for host in hosts:
                bucket = by_listener[listener].setdefault(host, [])
                for rule, picker in zip(route.rules, pickers(route)):
                    for i, match in enumerate(rule.matches):
                        bucket.append(Candidate(listener, route, rule, match, i, host, picker))
    ports: dict[int, dict[Listener, ListenerRoutes]] = {}
    for listener, hosts in by_listener.items():
        ports.setdefault(listener.port, {})[listener] = ListenerRoutes(listener, _host_tiers(hosts))
    return RouteTable(
        config,
        {port: _host_map(group, lambda l: l.hostname) for port, group in ports.items()},
        attached,
    )


def _host_tiers(hosts: dict[str, list[Candidate]]) -> HostMap[tuple[Tier, ...]]:
    tiers = {host: Tier(cands) for host, cands in hosts.items()}
    default = (tiers[ANY_HOST],) if ANY_HOST in tiers else ()
    wild = {h: t for h, t in tiers.items() if h.startswith("*.")}

    def chain(name: str) -> tuple[Tier, ...]:
        return tuple(wild[k] for k in host_suffixes(name) if k in wild)

    exact = {h: (t,) + chain(h) + default for h, t in tiers.items() if h and not h.startswith("*.")}
    wildcard = {h: (t,) + chain(h[2:]) + default for h, t in wild.items()}
    return HostMap(exact, wildcard, default or None)


def _host_map(values: dict[T, object], hostname_of: Callable[[T], str | None]) -> HostMap:
    exact: dict[str, object] = {}
    wildcard: dict[str, object] = {}
    default = None
    for key, value in values.items():
        name = hostname_of(key)
        if name is None:
            default = default or value
        elif name.startswith("*."):
            wildcard.setdefault(name, value)
        else:
            exact.setdefault(name, value)
    return HostMap(exact, wildcard, default)
