"""The CNN and bigram distilled routers see a token's context: incremental decoding must route as a full forward."""
import pytest
import torch
from fairseq import options
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from fairseq_stablemoe.tasks.stablemoe_language_modeling import StableMoELanguageModelingTask

VOCAB = 40


@pytest.fixture(scope="module")
def task_and_cfg():
    dictionary = Dictionary()
    for i in range(VOCAB - dictionary.nspecial):
        dictionary.add_symbol(f"w{i}")
    args = options.parse_args_and_arch(options.get_training_parser(), [
        "unused", "--user-dir", "fairseq_stablemoe", "--task", "stablemoe_language_modeling",
        "--arch", "stablemoe_lm_tiny", "--tokens-per-sample", "64"])
    cfg = convert_namespace_to_omegaconf(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: extra threads only contend
    yield StableMoELanguageModelingTask(cfg.task, dictionary, dictionary), cfg.model
    torch.set_num_threads(threads)


@pytest.mark.parametrize("router", ["cnn", "bigram"])
def test_incremental_decoding_routes_as_the_full_sequence(router, task_and_cfg):
    task, model_cfg = task_and_cfg
    model_cfg.distilled_router = router
    torch.manual_seed(0)
    model = task.build_model(model_cfg).eval()
    routing = model.moe_layers()[0].routing
    routing.enter_stage2()
    experts = []
    routing.register_forward_hook(lambda module, inputs, out: experts.append(out.expert))
    tokens = torch.randint(4, VOCAB, (2, 16))

    with torch.no_grad():
        full_logits = model(tokens)[0]
        full = experts.pop().view(16, 2)  # time-major
        state = {}
        step_logits = [model.decoder(tokens[:, :t + 1], incremental_state=state)[0] for t in range(16)]
    assert torch.equal(torch.stack(experts).squeeze(-1), full)
    assert torch.allclose(torch.cat(step_logits, 1), full_logits, atol=1e-5)

    # the test means something only if a token's expert depends on its context
    token_alone = routing.distilled_router.route(tokens.reshape(-1, 1), 1).view(2, 16).t()
    assert not torch.equal(token_alone, full)
