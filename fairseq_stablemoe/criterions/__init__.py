from . import stablemoe_cross_entropy  # noqa: F401
