"""fairseq's Python hub interface (score / sample / translate) for StableMoE models.

    import fairseq_stablemoe
    lm = fairseq_stablemoe.StableMoELanguageModel.from_pretrained(save_dir, "checkpoint_best.pt",
                                                                   data_name_or_path=data_bin)
    mt = fairseq_stablemoe.StableMoETransformerModel.from_pretrained(save_dir, "checkpoint_best.pt",
                                                                      data_name_or_path=data_bin,
                                                                      source_lang="de", target_lang="en")

It is fairseq's GeneratorHubInterface; for multilingual translation it also drops the target-language tag
that the task forces as the first output token (fairseq-generate drops it too; fairseq's hub does not).
"""
from fairseq import hub_utils


def target_language_tag(task):
    """The token id translation_multi_simple_epoch forces as the first output token, or None."""
    langtoks = getattr(getattr(task, "args", None), "langtoks", None)
    if not langtoks or not langtoks["main"][1]:
        return None
    return task.data_manager.get_decoder_langtok(task.args.target_lang, langtoks["main"][1])


def check_languages(given, langs=None):
    missing = [name for name in ("source_lang", "target_lang") if given.get(name) is None]
    if missing:
        known = f" (its languages: {', '.join(langs)})" if langs else ""
        raise ValueError(f"a multilingual translation model translates one direction at a time: pass "
                         f"{' and '.join(f'{name}=...' for name in missing)} to from_pretrained{known}")


class StableMoEHubInterface(hub_utils.GeneratorHubInterface):
    def __init__(self, cfg, task, models):
        if getattr(getattr(task, "args", None), "langtoks", None) is not None:
            check_languages(vars(task.args), task.langs)
        super().__init__(cfg, task, models)
        tag = target_language_tag(task)
        self._strip = {tag} if tag is not None else None

    def string(self, tokens) -> str:
        return self.tgt_dict.string(tokens, extra_symbols_to_ignore=self._strip)


def from_pretrained(model_cls, model_name_or_path, checkpoint_file="model.pt", data_name_or_path=".", **kwargs):
    """fairseq's BaseFairseqModel.from_pretrained with StableMoEHubInterface, less its log of the whole config."""
    if ("source_lang" in kwargs) != ("target_lang" in kwargs):
        check_languages(kwargs)  # fairseq's task set-up would fail first, on a language pair "xx-None"
    loaded = hub_utils.from_pretrained(model_name_or_path, checkpoint_file, data_name_or_path,
                                       archive_map=model_cls.hub_models(), **kwargs)
    return StableMoEHubInterface(loaded["args"], loaded["task"], loaded["models"])
