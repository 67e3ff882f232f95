"""The Ray Serve application: the replica (``serving.app.RecommenderDeployment``) bound to one
model version, with its scaling, resources and options from the serving settings."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serving.app import RecommenderDeployment
from serving.config import ServingConfig
from serving.deploy_version import code_version, settings_digest
from training.registry import Registry


def build_app(registry: Registry, cfg: ServingConfig, version: int) -> Application:
    """The application bound to one version; redeploying with another version is in-place."""
    if cfg.max_replicas is not None and cfg.max_replicas > cfg.replicas:
        scaling: dict[str, Any] = {
            "autoscaling_config": {
                "min_replicas": cfg.replicas,
                "max_replicas": cfg.max_replicas,
                "target_ongoing_requests": cfg.target_ongoing_requests,
            }
        }
    else:
        scaling = {"num_replicas": cfg.replicas}
    resources = cfg.on_serving_nodes()
    deployment = RecommenderDeployment.options(  # type: ignore[attr-defined]
        name="recommender",
        max_ongoing_requests=cfg.max_ongoing_requests,
        user_config={"version": version},
        ray_actor_options={"num_cpus": 0.25, "resources": resources},
        graceful_shutdown_timeout_s=5,
        logging_config={"enable_access_log": cfg.access_log},
        health_check_period_s=2,
        **scaling,
    )
    # serve.run gives code deployed from Python a random version, so every redeploy restarts
    # all replicas. A version derived from the serving code makes a new user_config a
    # lightweight in-place update (reconfigure), as with `serve deploy` config files. Serve does
    # not compare init args, so the settings are part of the version: a redeploy with another
    # key or limit (e.g. `up` restarted against a running cluster) restarts the replicas.
    deployment._version = f"{code_version()}-{settings_digest(cfg)}"
    # The config object itself travels in the init args (pickled, never JSON): its SecretStr key
    # keeps its value on the way and stays masked in any repr or log line.
    # The registry travels pickled (an absolute path or its URI and options).
    return deployment.bind(registry, cfg.model_copy())
