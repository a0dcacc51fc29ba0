from . import stablemoe_lm  # noqa: F401
