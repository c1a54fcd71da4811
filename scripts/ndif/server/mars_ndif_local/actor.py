"""A model actor for a CPU-only NDIF node: ndif's actor with the CUDA-only steps left out.

ndif's `BaseModelDeployment` loads weights onto the GPUs the controller assigned, then calls
`torch.cuda.synchronize()` and checks every tensor is on those GPUs; it parks replicas by moving
them to and from the GPU. Here the weights stay on the CPU in the server's default dtype
(NDIF_DEFAULT_DTYPE), and parking is not possible (CACHEABLE = False: the controller evicts).
Everything else (deserialization, execution on a worker thread with timeouts, saving only
`.save()`d values, result staging in the object store, status messages) is ndif's own code.
"""

from __future__ import annotations

import gc

import ray
from nnsight.modeling.huggingface import HuggingFaceModel

from ndif.services.ray.deployments.modeling.base import BaseModelDeployment

from . import _apply

_apply()


class _CPUDeployment(BaseModelDeployment):
    CACHEABLE = False

    def __init__(self, *args, **kwargs):
        # Ray ships the actor class by value: apply the shims in the worker, before ndif's init
        import mars_ndif_local

        mars_ndif_local._apply()
        super().__init__(*args, **kwargs)

    def load_from_disk(self) -> HuggingFaceModel:
        model = HuggingFaceModel.from_model_key(self.model_key, dispatch=True, dtype=self.dtype_name,
                                                **self.kwargs)
        model._module.requires_grad_(False)
        return model

    async def to_cache(self) -> None:  # pragma: no cover - never called: CACHEABLE is False
        raise RuntimeError("a CPU replica cannot be parked")

    def from_cache(self, gpu_mem_bytes_by_id) -> None:  # pragma: no cover
        raise RuntimeError("a CPU replica cannot be parked")

    def cleanup(self) -> None:
        self.kill_switch.clear()
        self.kill_reason = None
        self.execution_ident = None
        self.model.interleaver.cancel()
        gc.collect()


@ray.remote(num_cpus=1, max_restarts=-1)
class CPUModelActor(_CPUDeployment):
    """The actor class named in NDIF_MODEL_IMPORT_PATH for the local stack."""
