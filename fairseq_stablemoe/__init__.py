"""fairseq-stablemoe: StableMoE (Dai et al., ACL 2022) as a fairseq plugin (--user-dir).

Importing it registers the models, tasks and criteria with fairseq, so fairseq's own Python API works, e.g.
``StableMoELanguageModel.from_pretrained(save_dir, "checkpoint_best.pt", data_name_or_path=data_bin)``.
"""
from . import checkpoints  # noqa: F401  (first: lets torch>=2.6 load fairseq checkpoints safely)
from . import distributed_wait, environment, quiet  # noqa: F401
from . import criterions, models, tasks  # noqa: F401  (registers them with fairseq)
from .models.stablemoe_lm import StableMoELanguageModel
from .models.stablemoe_transformer import StableMoETransformerModel

quiet.filter_known_noise()
environment.warn_on_import()

__all__ = ["StableMoELanguageModel", "StableMoETransformerModel"]
