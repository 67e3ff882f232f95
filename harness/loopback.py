"""Ray on loopback: every node, driver and probe that tests and benchmarks start binds and
announces 127.0.0.1.

Ray rewrites 127.0.0.1 to the machine's interface address wherever it meets it (``ray start
--node-ip-address``, ``ray start --address``, ``ray.init(address=...)``) and picks that address
for a Ray instance ``ray.init()`` starts, unless it believes multi-node clusters are off
(``ENV``), and there it refuses to start a worker node. Hence:

- ``keep()`` turns clusters off for this process and every process it starts;
- ``ray start`` runs as ``python -m harness.loopback start ...`` (``RAY_START``): loopback kept
  without the refusal.
"""

from __future__ import annotations

import os
import sys
from typing import Any

LOOPBACK = "127.0.0.1"
ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
RAY_START = [sys.executable, "-m", "harness.loopback"]


def keep() -> None:
    """Ray keeps to loopback in this process (Ray imported or not) and the processes it starts."""
    os.environ.update(ENV)
    constants: Any = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # imported already: Ray read ENV at import
        constants.ENABLE_RAY_CLUSTER = False


def main() -> None:
    """The ``ray`` command with loopback kept and worker nodes allowed."""
    import ray._private.ray_constants as ray_constants
    import ray._private.services as services
    from ray.scripts.scripts import main as ray_main

    ray_constants.ENABLE_RAY_CLUSTER = True  # ENV, inherited by the node's processes, forbids it
    resolve = services.resolve_ip_for_localhost

    def keep_loopback(host: str) -> str:
        return host if host == LOOPBACK else str(resolve(host))

    services.resolve_ip_for_localhost = keep_loopback
    sys.argv = ["ray", *sys.argv[1:]]
    ray_main()


if __name__ == "__main__":
    main()
