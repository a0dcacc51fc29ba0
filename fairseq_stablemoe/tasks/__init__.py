from . import stablemoe_language_modeling, stablemoe_translation_multi_simple_epoch  # noqa: F401
