"""Plain cross-entropy on instance-sampled batches: the baseline every method is compared to."""
from ltsearch.methods.base import Method, register


@register
class CrossEntropy(Method):
    name = "ce"
