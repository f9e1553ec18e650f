"""The Kubernetes API of the sandbox and preview measurements: the project's API server test
double (tests/support/kubeapi) in a process of its own, holding

- the SandboxClaim `sandboxes/bench` (annotation `sandgate.dev/owner: bench`) and the Sandbox it
  owns, Ready, with `status.podIPs: [127.0.0.1]` (the benchmark's origin) and a pod selector;
- `--previews N` previews of the origin's port, made as the gateway makes them
  (gateway/preview/objects.py: random tokens, owned by the Sandbox) and created through the
  double's admission: N HTTPRoutes and N Services.

Once it serves, it writes `--ready-file` (JSON: the kubeconfig's path, the number of previews,
the first hosts, and the URL of a side listener that counts the single-HTTPRoute GETs the double
has answered: a gateway's lookups on a preview-host miss), then serves until it is killed.

The double sends a watch event as soon as the object is written, before it answers the write:
a gateway watching it learns of a new preview before the client that created it does. A real
API server's watch lags by some milliseconds. With `--watch-delay-ms D` a second kubeconfig
points at a proxy in this process that passes everything through at once except the bytes of
watch responses, which it holds back D ms: a gateway using it sees new previews D ms late.

Run from the checkout (PYTHONPATH=.):

    python bench/kube_double.py --workdir DIR --ready-file FILE --port ORIGIN_PORT [--previews N]
        [--watch-delay-ms D]
"""

import argparse
import asyncio
import json
from datetime import datetime, timezone
from pathlib import Path

from aiohttp import web

import loops
from cluster import GATEWAY_NAMESPACE, NAMESPACE, OWNER, POD_IP, PREVIEW_TTL_SECONDS, SANDBOX, ZONE
from gateway.config.model import PreviewZone
from gateway.preview import objects
from gateway.preview.tokens import new_token
from harness import free_port
from tests.support.kubeapi import KubeApi, running_kube_api
from tests.support.kubeapi.kubeconfig import write_kubeconfig
from tests.support.sandboxes import SANDBOX_API, claim_object, pod_selector, ready_status, sandbox_object

HOSTS_REPORTED = 10
# Idle watches get a bookmark this often: rarely, so that an idle double costs no CPU.
BOOKMARK_SECONDS = 60.0


def add_sandbox(api: KubeApi) -> dict:
    claim = api.create(claim_object(NAMESPACE, SANDBOX, annotations={"sandgate.dev/owner": OWNER}))
    api.create(sandbox_object(NAMESPACE, SANDBOX, owner_claim=claim))
    status = ready_status(POD_IP, selector=pod_selector(SANDBOX))
    return api.set_status(SANDBOX_API, "Sandbox", NAMESPACE, SANDBOX, status)


def add_previews(api: KubeApi, sandbox: dict, count: int, port: int) -> list[str]:
    """`count` previews of `port`; their hosts. The Services are headless (`clusterIP: None`),
    the one difference from the gateway's: the double allocates a cluster IP by scanning every
    Service, which makes 10,000 creates take hours, and the gateway never reads these Services."""
    zone = PreviewZone(namespace=GATEWAY_NAMESPACE, name="previews", zone=ZONE, gateway_namespace=GATEWAY_NAMESPACE,
                       gateway_name="gw", idle_ttl=PREVIEW_TTL_SECONDS, max_lifetime=PREVIEW_TTL_SECONDS)
    uid = sandbox["metadata"]["uid"]
    label, _, value = pod_selector(SANDBOX).partition("=")
    now = datetime.now(timezone.utc)
    hosts = []
    for _ in range(count):
        preview = objects.new_preview(new_token(), NAMESPACE, SANDBOX, uid, port, OWNER, zone, now)
        service = objects.service(preview, {label: value})
        service["spec"]["clusterIP"] = "None"
        api.create(service)
        api.create(objects.httproute(preview, zone))
        hosts.append(preview.host)
    return hosts


async def serve_lookups(api: KubeApi) -> str:
    """GET / answers {"lookups": N}: the GETs of one preview HTTPRoute the double answered."""
    prefix = f"/apis/gateway.networking.k8s.io/v1/namespaces/{NAMESPACE}/httproutes/preview-"

    async def lookups(_request: web.Request) -> web.Response:
        count = sum(1 for method, path in api.requests if method == "GET" and path.startswith(prefix))
        return web.json_response({"lookups": count})

    app = web.Application()
    app.router.add_get("/", lookups)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return f"http://127.0.0.1:{port}/"


async def serve_lagging_watches(api: KubeApi, delay: float) -> str:
    """A TCP proxy to the double that delays what watch responses send by `delay` seconds (each
    chunk from when it arrived), and nothing else; the URL to give a client."""
    _, _, address = api.url.rpartition("/")
    api_host, _, api_port = address.partition(":")
    loop = asyncio.get_running_loop()

    async def connection(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        api_reader, api_writer = await asyncio.open_connection(api_host, int(api_port))
        watching = False  # the request on this connection now is a watch (one at a time: HTTP/1.1)
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def upstream() -> None:
            nonlocal watching
            while data := await client_reader.read(65536):
                if data[:4] in (b"GET ", b"POST", b"PUT ", b"PATC", b"DELE"):  # a request starts
                    watching = b"watch=" in data.partition(b"\r\n")[0].lower()
                api_writer.write(data)
                await api_writer.drain()
            api_writer.close()

        async def downstream() -> None:
            while data := await api_reader.read(65536):
                held.put_nowait((loop.time() + (delay if watching else 0.0), data))
            held.put_nowait((loop.time(), b""))

        async def release() -> None:
            while True:
                due, data = await held.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    break
                client_writer.write(data)
                await client_writer.drain()
            client_writer.close()

        tasks = [asyncio.create_task(step()) for step in (upstream, downstream, release)]
        try:
            await asyncio.gather(*tasks)
        except (ConnectionError, OSError):
            pass
        finally:
            for task in tasks:
                task.cancel()
            api_writer.close()
            client_writer.close()

    port = free_port()
    await asyncio.start_server(connection, "127.0.0.1", port)
    return f"http://127.0.0.1:{port}"


async def serve(args: argparse.Namespace) -> None:
    async with running_kube_api(args.workdir, bookmark_interval=BOOKMARK_SECONDS) as api:
        sandbox = add_sandbox(api)
        hosts = add_previews(api, sandbox, args.previews, args.port)
        ready = {"kubeconfig": str(api.kubeconfig), "previews": len(hosts), "hosts": hosts[:HOSTS_REPORTED],
                 "lookups_url": await serve_lookups(api), "lagging_kubeconfig": None}
        if args.watch_delay_ms:
            lagging = await serve_lagging_watches(api, args.watch_delay_ms / 1000)
            kubeconfig = write_kubeconfig(args.workdir / "lagging-kubeconfig", lagging, api.token)
            ready["lagging_kubeconfig"] = str(kubeconfig)
        partial = args.ready_file.with_suffix(".partial")
        partial.write_text(json.dumps(ready))
        partial.rename(args.ready_file)  # whole or absent: the bench polls for it
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True, help="the sandbox app's port (previews expose it)")
    parser.add_argument("--previews", type=int, default=0)
    parser.add_argument("--watch-delay-ms", type=int, default=0,
                        help="also serve a kubeconfig whose watches lag this much (default: none)")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=loops.new_event_loop) as runner:
        runner.run(serve(args))


if __name__ == "__main__":
    main()
