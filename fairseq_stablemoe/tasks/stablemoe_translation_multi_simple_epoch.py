"""fairseq's translation_multi_simple_epoch, plus the StableMoE stage switch and the language of each sentence."""
from typing import Optional, Tuple

import torch
from fairseq.data.multilingual.multilingual_utils import get_lang_tok
from fairseq.tasks import register_task
from fairseq.tasks.translation_multi_simple_epoch import TranslationMultiSimpleEpochTask

from ..checks.guard import GuardedTask
from ..moe import moe_layers
from .language_experts import language_expert_counts, log_language_usage, routing_decisions
from .routing_probes import add_routing_probe_args
from .stage1_auto import add_stage1_auto_args
from .moe_task import MoETask


@register_task("stablemoe_translation_multi_simple_epoch")
class StableMoETranslationMultiSimpleEpochTask(GuardedTask, MoETask, TranslationMultiSimpleEpochTask):
    """Language tokens, temperature sampling, one or many pairs, shared or separate dictionaries: all fairseq's.
    Adds the stage switch, routing probes (--routing-probe-interval) and per-language expert usage."""

    @staticmethod
    def add_args(parser):
        TranslationMultiSimpleEpochTask.add_args(parser)
        add_routing_probe_args(parser)
        add_stage1_auto_args(parser)

    _lang_tables = None  # (source, target) token id -> language index, built at the first validation batch

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None,
                        prefix_allowed_tokens_fn=None):
        # fairseq's hub interface (translate(), sample()) passes prefix_allowed_tokens_fn, which
        # translation_multi_simple_epoch's signature lacks
        if prefix_allowed_tokens_fn is not None:
            raise ValueError("prefix_allowed_tokens_fn is not supported by translation_multi_simple_epoch")
        return super().build_generator(models, args, seq_gen_cls, extra_gen_cls_kwargs)

    def _language_of_token(self, dictionary) -> torch.Tensor:
        """Token id -> index in self.langs for the language tags (`__de__`), -1 for every other token."""
        table = torch.full((len(dictionary),), -1, dtype=torch.long)
        for i, lang in enumerate(self.langs):
            idx = dictionary.index(get_lang_tok(lang, self.args.lang_tok_style))
            if idx != dictionary.unk():
                table[idx] = i
        return table

    def sentence_languages(self, sample) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(source language, target language) of each sentence, as indices in self.langs (-1 = not known),
        read from the language tags in the batch; None when the batch has no tags."""
        enc_spec, dec_spec = self.args.langtoks["main"]
        src = sample["net_input"]["src_tokens"]
        prev = sample["net_input"].get("prev_output_tokens")
        if self._lang_tables is None:
            self._lang_tables = (self._language_of_token(self.source_dictionary),
                                 self._language_of_token(self.target_dictionary))
        src_table, tgt_table = (t.to(src.device) for t in self._lang_tables)
        unknown = src.new_full((src.size(0),), -1)
        enc_tag = src_table[src].max(1).values if enc_spec else unknown
        dec_tag = tgt_table[prev].max(1).values if dec_spec and prev is not None else unknown
        src_lang = enc_tag if enc_spec and enc_spec.startswith("src") else unknown
        tgt_lang = dec_tag if dec_spec else (enc_tag if enc_spec else unknown)
        if src_lang.lt(0).all() and tgt_lang.lt(0).all():
            return None
        return src_lang, tgt_lang

    def valid_step(self, sample, model, criterion):
        """fairseq's, and the tokens each expert takes per language (when the batch has language tags)."""
        languages = self.sentence_languages(sample)
        if languages is None:
            return super().valid_step(sample, model, criterion)
        with routing_decisions(model) as decisions:
            loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        num_experts = max(layer.num_experts for layer in moe_layers(model))
        logging_output["moe_lang_expert"] = language_expert_counts(decisions, *languages, len(self.langs), num_experts)
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        if logging_outputs and "moe_lang_expert" in logging_outputs[0]:
            log_language_usage(sum(log["moe_lang_expert"] for log in logging_outputs), self.langs)
