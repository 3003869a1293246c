"""batchscale: a distributed large-batch scaling benchmark (import name `bench`)."""

__version__ = "0.1.0"
