"""fairseq-stablemoe: StableMoE (Dai et al., ACL 2022) as a fairseq plugin (--user-dir)."""
from . import checkpoints  # noqa: F401  (first: lets torch>=2.6 load fairseq checkpoints safely)
from . import criterions, models, tasks  # noqa: F401  (registers them with fairseq)
