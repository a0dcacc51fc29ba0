from . import stablemoe_cross_entropy, stablemoe_label_smoothed_cross_entropy  # noqa: F401
