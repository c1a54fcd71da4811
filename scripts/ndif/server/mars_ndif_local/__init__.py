"""Server-side adaptations that let the published `ndif` 0.1.2 run on one CPU-only machine.

This package lives only on the local NDIF server's PYTHONPATH (scripts/ndif_local.py puts it
there); the `mars` client never imports it. Importing it applies three shims, each for a
mismatch measured between ndif 0.1.2 and nnsight 0.8.1 or for running without a GPU or the Hub:

1. `Remotable.describe_checkpoint` / `max_tp_size`: ndif passes `trust_remote_code=`, which
   nnsight 0.8.1 does not take; the keyword is accepted and dropped (nnsight reads it from the
   model key instead).
2. `HuggingFaceModel._hub_parameter_count`: offline (HF_HUB_OFFLINE=1) the Hub cannot be asked
   for a parameter count; report "unknown" so nnsight sizes the model from its cached config.
3. The model actor (`actor.CPUModelActor`) and the controller (`controller.ControllerActor`)
   import this module, so the shims are in place in every Ray worker that sizes or loads a model.
"""

from __future__ import annotations

import os


def _apply() -> None:
    from nnsight.modeling.huggingface import HuggingFaceModel
    from nnsight.modeling.mixins.remotable import Remotable

    if getattr(Remotable, "_mars_ndif_local", False):
        return
    describe, max_tp = Remotable.describe_checkpoint.__func__, Remotable.max_tp_size.__func__

    def describe_checkpoint(cls, model_key, dtype, trust_remote_code=False):
        return describe(cls, model_key, dtype)

    def max_tp_size(cls, model_key, trust_remote_code=False):
        return max_tp(cls, model_key)

    Remotable.describe_checkpoint = classmethod(describe_checkpoint)
    Remotable.max_tp_size = classmethod(max_tp_size)

    hub_count = HuggingFaceModel._hub_parameter_count

    def _hub_parameter_count(repo_id, revision):
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            return None
        return hub_count(repo_id, revision)

    HuggingFaceModel._hub_parameter_count = staticmethod(_hub_parameter_count)
    Remotable._mars_ndif_local = True


_apply()
