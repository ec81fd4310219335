"""Minimal stand-in for `ray` on a GPU box that cannot install it (the ray wheel is over the carry limit).
verl 0.6.1 imports ray at import time (verl.protocol, verl.utils.distributed, worker decorators) but the
BT trainer never starts a ray cluster. Anything that really calls ray fails loudly here."""

import sys
import types


class ObjectRef:  # isinstance checks in verl.protocol
    pass


def _unavailable(*args, **kwargs):
    raise RuntimeError("ray is stubbed on this machine; the BT trainer does not need it")


def remote(*args, **kwargs):  # used as @ray.remote / @ray.remote(...)
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]
    return lambda fn: fn


init = get = put = wait = kill = get_actor = _unavailable


def is_initialized():
    return False


def _module(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


actor = _module("ray.actor", ActorHandle=object)
util = _module("ray.util", list_named_actors=_unavailable, get_node_ip_address=lambda: "127.0.0.1")
_private = _module("ray._private")
_module("ray._private.runtime_env")
_module("ray._private.runtime_env.constants", RAY_JOB_CONFIG_JSON_ENV_VAR="RAY_JOB_CONFIG_JSON_ENV_VAR")
_module("ray.util.placement_group", PlacementGroup=object, placement_group=_unavailable)
_module(
    "ray.util.scheduling_strategies", NodeAffinitySchedulingStrategy=object, PlacementGroupSchedulingStrategy=object
)
experimental = _module("ray.experimental")
