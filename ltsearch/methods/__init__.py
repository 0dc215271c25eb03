"""Long-tail methods, one module each, registered by name (see :mod:`ltsearch.methods.base`)."""
from ltsearch.methods.base import Batch, Method, MethodContext, Phase, get_method, method_names, register
from ltsearch.methods import bbn, ce, feature_aug, resample, reweight, two_stage  # noqa: F401

__all__ = ["Batch", "Method", "MethodContext", "Phase", "get_method", "method_names", "register"]
