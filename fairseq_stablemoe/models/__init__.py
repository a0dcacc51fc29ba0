from . import stablemoe_lm  # noqa: F401
from . import stablemoe_transformer  # noqa: F401
