"""`phi3 serve --ray`: the same OpenAI-compatible app as a Ray Serve deployment of N replicas.

Each replica loads the model through phi3's normal path (phi3cli.loading.load: the store on its node, built there if
needed) and serves create_app's Starlette app through serve.ingress. Ray routes requests to replicas, checks
their health and restarts the ones that die; phi3 schedules nothing itself. A replica takes at most
max_sequences requests at once, so a request Ray has handed to a replica is already generating, and the ones
waiting stay with Ray's router, which gives them to a live replica if one dies.

Imported only on the --ray path: nothing else in phi3 imports Ray.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from phi3cli.errors import Phi3Error
from phi3cli.util import first_line

try:
    import ray
    from ray import serve
except ImportError as exc:  # pragma: no cover - depends on the install
    raise Phi3Error(
        f"phi3 serve --ray needs the ray extra ({exc.name} is not installed).",
        hint="pip install 'phi3cli[ray]'",
    ) from None

APP_NAME = "phi3"
DEPLOYMENT_NAME = "phi3-model"


@dataclass
class RayPlan:
    """What to deploy: the model as phi3cli.loading.load takes it, where to listen, and how many replicas."""

    model: str
    load_kwargs: dict[str, Any]  # load()'s keyword arguments (backend, device, format, threads, options...)
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    address: str | None = None  # an existing cluster; None starts a local Ray instance
    api_key: str | None = None
    max_ongoing_requests: int = 8  # per replica: what its model runs at once
    replica_cpus: float = 1.0
    env: dict[str, str] = field(default_factory=dict)  # passed to the replicas' processes
    images: Any = None  # phi3cli.serve.images.ImageOptions (--max-image-pixels, --allow-image-urls); None: defaults


@serve.ingress()
class Phi3Replica:
    """One replica: the model loaded once, and phi3's Starlette app over it."""

    def __init__(self, model: str, load_kwargs: dict[str, Any], api_key: str | None, images: Any = None):
        from phi3cli import serve as server
        from phi3cli.loading import load

        _log_requests()
        start = time.perf_counter()
        self.loaded = load(model, **load_kwargs)
        server.warm_up(self.loaded)
        self.name, self.api_key, self.images = model, api_key, images
        logging.getLogger("phi3.serve").info(
            f"replica ready in {time.perf_counter() - start:.1f} s (pid {os.getpid()}): {server.describe(self.loaded)}"
        )

    def __serve_build_asgi_app__(self):
        from phi3cli.serve.app import create_app

        self._phi3_app = create_app(self.loaded, self.name, api_key=self.api_key, images=self.images)  # `app`: Ray's
        return self._phi3_app

    def check_health(self) -> None:
        """Ray calls this periodically; raising marks the replica unhealthy, and Ray replaces it."""
        if hasattr(self, "_phi3_app") and not self._phi3_app.state.jobs.healthy():
            raise RuntimeError("phi3's generation workers stopped")


def _log_requests() -> None:
    """The request log lines, on the replica's stderr (Ray forwards them to the driver's console)."""
    log = logging.getLogger("phi3.serve")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def deploy(plan: RayPlan, note: Callable[[str], None]) -> None:
    """Join (or start) Ray, start Serve's HTTP proxy on host:port, and run the app (returns once it runs)."""
    runtime_env = {"env_vars": plan.env} if plan.env else None
    if plan.address is None:
        cpus = max(os.cpu_count() or 1, int(plan.replicas * plan.replica_cpus + 0.999))
        ray.init(
            address="local",
            num_cpus=cpus,
            runtime_env=runtime_env,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    else:
        ray.init(address=plan.address, runtime_env=runtime_env, logging_level=logging.WARNING)
    note(f"Ray {ray.__version__}: {len(ray.nodes())} node(s), {ray.cluster_resources().get('CPU', 0):g} CPUs")
    serve.start(proxy_location="HeadOnly", http_options={"host": plan.host, "port": plan.port})
    deployment = serve.deployment(
        Phi3Replica,
        name=DEPLOYMENT_NAME,
        num_replicas=plan.replicas,
        max_ongoing_requests=plan.max_ongoing_requests,
        ray_actor_options={"num_cpus": plan.replica_cpus},
        health_check_period_s=5,
        health_check_timeout_s=30,
    )
    try:
        serve.run(
            deployment.bind(plan.model, plan.load_kwargs, plan.api_key, plan.images), name=APP_NAME, route_prefix="/"
        )
    except RuntimeError as exc:
        raise Phi3Error(
            f"Ray Serve could not start the replicas: {first_line(exc)}",
            hint="The replicas' own errors are in Ray's log above.",
        ) from exc


def replicas_running() -> int:
    status = serve.status().applications.get(APP_NAME)
    if status is None:
        return 0
    deployment = status.deployments.get(DEPLOYMENT_NAME)
    return deployment.replica_states.get("RUNNING", 0) if deployment else 0


def wait(note: Callable[[str], None], poll_s: float = 5.0) -> None:
    """Until Ctrl-C: say when the number of running replicas changes (Ray restarts the ones that die)."""
    seen = replicas_running()
    while True:
        time.sleep(poll_s)
        now = replicas_running()
        if now != seen:
            note(f"{now} replica(s) running")
            seen = now


def undeploy(started_here: bool) -> None:
    """Remove the app (and Serve with the Ray instance, if this process started it)."""
    if not ray.is_initialized():
        return
    try:
        if started_here:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()
