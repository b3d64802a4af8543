"""The Ray Serve application: ``serve run service.ray.app:build_app replicas=4`` or a ``RayService``'s
``import_path: service.ray.app:build_app`` with ``args``.

Three deployments: ``LoraswapIngress`` (HTTP, keys and forwards), ``LoraswapReplica`` (the model, routed
by ``AffinityRequestRouter``), ``MetricsHub`` (one scrape target). ``args`` are ``RayOptions`` keys plus
``Settings`` fields (``service.ray.options``).
"""

from __future__ import annotations

from typing import Any

from service.ray.options import RayOptions

APP_NAME = "loraswap"
HEALTH_CHECK_PERIOD_S = 5.0


def build_app(args: dict[str, Any] | None = None) -> Any:
    """A Ray Serve ``Application`` for ``args`` (see ``RayOptions``)."""
    from ray import serve
    from ray.serve.config import AutoscalingConfig, RequestRouterConfig

    from basemodel.loader import resolve_base_model
    from service.ray.fleet_metrics import MetricsHub
    from service.ray.ingress import LoraswapIngress
    from service.ray.replica import LoraswapReplica
    from service.ray.router import AffinityRequestRouter

    options = RayOptions.from_args(args)
    settings = options.settings()
    resolve_base_model(settings.base_model, settings.models_dir)  # install tiny-sd once, before replicas
    bound = options.to_args()
    most = options.autoscale[1] if options.autoscale else options.replicas

    scaling: dict[str, Any] = {"num_replicas": options.replicas}
    if options.autoscale is not None:
        low, high = options.autoscale
        scaling = {
            "autoscaling_config": AutoscalingConfig(
                min_replicas=low,
                max_replicas=high,
                initial_replicas=low,
                target_ongoing_requests=options.target_ongoing_requests,
            )
        }
    router: dict[str, Any] = {
        "request_router_class": AffinityRequestRouter,
        "request_router_kwargs": {"policy": options.routing, "spill": options.spill},
        "request_routing_stats_period_s": options.routing_stats_period_s,
        "request_routing_stats_timeout_s": max(5.0, options.routing_stats_period_s * 5),
    }
    replica: Any = serve.deployment(
        LoraswapReplica,
        name="LoraswapReplica",
        max_ongoing_requests=options.max_ongoing_requests,
        # a replica holds no more than its own queue allows; beyond that the caller sees 429
        max_queued_requests=settings.max_queue * most,
        # scale-down / shutdown: stop routing, wait for in-flight generations, then drain the worker
        graceful_shutdown_wait_loop_s=1.0,
        graceful_shutdown_timeout_s=settings.request_timeout_s + settings.graceful_timeout_s,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=30.0,
        request_router_config=RequestRouterConfig(**router),
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.gpus(settings)},
        **scaling,
    )
    hub = serve.deployment(MetricsHub, name="MetricsHub", num_replicas=1, ray_actor_options={"num_cpus": 0})
    ingress: Any = serve.deployment(
        serve.ingress()(LoraswapIngress),
        name="LoraswapIngress",
        num_replicas=1,
        max_ongoing_requests=max(100, 4 * settings.max_queue),
        graceful_shutdown_timeout_s=settings.request_timeout_s + settings.graceful_timeout_s,
        ray_actor_options={"num_cpus": 0},
    )
    hub_app = hub.bind()  # type: ignore[attr-defined]
    return ingress.bind(bound, replica.bind(bound, hub_app), hub_app)
