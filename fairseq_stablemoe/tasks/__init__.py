from . import stablemoe_language_modeling  # noqa: F401
