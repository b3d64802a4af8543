"""Ray Serve mode (``loraswap serve --ray``): replicas of the one app, routed by adapter affinity.

``routing`` is the policy (pure, shared with the simulator in ``loadtests/ray_affinity``), ``router``
plugs it into Ray Serve's request router, ``replica`` runs the Litestar app of ``service.app`` per
replica, ``ingress`` is the HTTP front that keys and forwards requests, ``app`` builds the application
(``serve run service.ray.app:build_app``). Importing this package does not import Ray.
"""
