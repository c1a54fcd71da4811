"""ndif's controller actor, imported through this package so its shims apply in its worker."""

from __future__ import annotations

import ray

from ndif.services.ray.deployments.controller.controller import _ControllerActor

from . import _apply

_apply()


@ray.remote(num_cpus=0, num_gpus=0, max_restarts=-1, resources={"head": 1})
class ControllerActor(_ControllerActor):
    """The controller named in NDIF_CONTROLLER_IMPORT_PATH for the local stack."""

    def __init__(self, *args, **kwargs):
        # Ray ships the actor class by value: apply the shims in the worker, before ndif's init
        import mars_ndif_local

        mars_ndif_local._apply()
        super().__init__(*args, **kwargs)
