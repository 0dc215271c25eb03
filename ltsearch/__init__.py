"""ltsearch: search long-tailed recognition methods and their hyper-parameters."""
__version__ = "0.1.0"
