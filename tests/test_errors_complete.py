"""docs/errors.md lists every refusal and warning of the package: each message the code raises or warns (found by
walking the AST of every `raise`, `logger.warning`, `warnings.warn`, `parser.error` and `sys.exit`) matches the exact text of
a row there. A message added without its row fails here."""
import ast
import os
import re
from typing import Dict, List, Optional

import helpers
from test_errors import doc_messages

PACKAGE = helpers.PLUGIN
DOC = os.path.join(helpers.ROOT, "docs", "errors.md")
WARNING_CALLS = {"warning", "warn", "error"}  # logger.warning / logging.warning, warnings.warn, parser.error


def _pattern(node, calls_of) -> Optional[List[str]]:
    """Regexes of the strings `node` can evaluate to (a formatted value matches any text); None if unknown."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [re.escape(node.value)]
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            sub = _pattern(value, calls_of) if isinstance(value, ast.Constant) else [".+?"]
            parts.append(sub[0])
        return ["".join(parts)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _pattern(node.left, calls_of), _pattern(node.right, calls_of)
        return [a + b for a in left for b in right] if left and right else None
    if isinstance(node, ast.Name):  # a helper's parameter (`def fail(msg): raise ValueError(msg)`)
        return calls_of(node.id)
    return None


def code_messages() -> Dict[str, List[str]]:
    """{'file:line': [regex, ...]} of every message raised or warned in the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            tree = ast.parse(open(path).read())
            functions = [f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
            for function in [tree, *functions]:
                params = [a.arg for a in function.args.args] if function is not tree else []

                def calls_of(param, function=function, params=params):
                    """The strings passed for `param` wherever `function` is called in this file."""
                    if param not in params:
                        return None
                    index, patterns = params.index(param), []
                    for call in ast.walk(tree):
                        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == function.name \
                                and len(call.args) > index:
                            patterns += _pattern(call.args[index], lambda _: None) or ["<unknown>"]
                    return patterns or None

                for node in ast.walk(function):
                    if node is not function and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        continue
                    message = None
                    if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
                        message = node.exc.args[0]
                    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args and (
                            node.func.attr in WARNING_CALLS or _is_sys_exit(node.func)):
                        message = node.args[0]
                    if isinstance(message, ast.Constant) and not isinstance(message.value, str):
                        continue  # sys.exit(0)
                    if message is not None and _owner(functions, tree, node) is function:
                        where = f"{os.path.relpath(path, helpers.ROOT)}:{node.lineno}"
                        found[where] = _pattern(message, calls_of) or ["<unknown>"]
    return found


def _is_sys_exit(func: ast.Attribute) -> bool:
    return func.attr == "exit" and isinstance(func.value, ast.Name) and func.value.id == "sys"


def _owner(functions, tree, node):
    """The innermost function that contains `node` (the module for top-level code)."""
    owners = [f for f in functions if f.lineno <= node.lineno <= f.end_lineno]
    return max(owners, key=lambda f: f.lineno) if owners else tree


def doc_rows() -> Dict[str, str]:
    """{case id: exact text} of docs/errors.md."""
    return doc_messages()


def doc_texts() -> List[str]:
    return list(doc_rows().values())


def test_every_message_in_the_code_has_a_row_in_docs_errors_md():
    messages, texts = code_messages(), doc_texts()
    assert len(messages) > 40
    missing = [f"{where}: {pattern}" for where, patterns in messages.items() for pattern in patterns
               if pattern == "<unknown>" or not any(re.fullmatch(pattern, text, re.S) for text in texts)]
    assert not missing, "messages without a row in docs/errors.md (or built so this test cannot read them):\n" + \
        "\n".join(missing)


# --- rows shown by example: the input of the row gives exactly its text ---

def _message(call):
    import pytest

    with pytest.raises(BaseException) as err:
        call()
    return str(err.value.code if isinstance(err.value, SystemExit) else err.value)


def _examples(tmp):
    import argparse

    import torch

    from fairseq_stablemoe.analysis import expert_tokens, fluctuation
    from fairseq_stablemoe.checkpoints import load_checked, prepare_resume
    from fairseq_stablemoe.moe import MoESettings
    from fairseq_stablemoe.moe.dispatch import ExpertParallelDispatcher
    from fairseq_stablemoe.reshard_checkpoint import reshard_optimizer_state
    from fairseq_stablemoe.tasks.routing_probes import FORMAT, RoutingProbes, load_probes

    def translation(**flags):
        args = dict(encoder_layers=2, decoder_layers=2, encoder_moe_layers=1, decoder_moe_layers=1,
                    encoder_moe_position="middle", decoder_moe_position="middle")
        settings = lambda: MoESettings.of(argparse.Namespace(**{**args, **flags}))  # noqa: E731
        return lambda: settings().check_placements({"encoder": 2, "decoder": 2})

    def one_probe():
        torch.save({"format": FORMAT, "updates": torch.zeros(1)}, f"{tmp}/routing_probes.pt")
        fluctuation.main([tmp])

    def other_format():
        os.makedirs(f"{tmp}/old")
        torch.save({"format": 2}, f"{tmp}/old/routing_probes.pt")
        load_probes(f"{tmp}/old")

    def last_alone():
        open(f"{tmp}/checkpoint_last.pt", "wb").write(b"\0" * 100)
        prepare_resume(tmp, "checkpoint_last.pt")

    optim = {"state": {}, "param_groups": [{"params": list(range(10))}]}
    return {
        "one-probe": one_probe,
        "probes-missing": lambda: load_probes(os.makedirs(f"{tmp}/empty") or f"{tmp}/empty"),
        "probes-format": other_format,
        "probes-values": lambda: RoutingProbes.from_task_config(argparse.Namespace(
            routing_probe_interval=-1, routing_probe_tokens=512)),
        "side-layers": translation(encoder_moe_layers=3),
        "side-position": translation(encoder_moe_position="left"),
        "no-side-layers": translation(encoder_moe_layers=0, decoder_moe_layers=0),
        "ep-split": lambda: ExpertParallelDispatcher(8, 3),
        "reshard-groups": lambda: reshard_optimizer_state({"state": {}, "param_groups": [{}, {}]}, [], []),
        "reshard-foreign": lambda: reshard_optimizer_state(optim, ["p"] * 12, []),
        "no-moe-layer": lambda: expert_tokens.ExpertTokenCounts(torch.nn.Linear(2, 2), len),
        "max-tokens": lambda: expert_tokens.main([tmp, "--path", "x.pt", "--max-tokens", "0"]),
        "path-missing": lambda: load_checked(f"{tmp}/missing.pt"),
        "last-truncated-alone": last_alone,
    }


def test_rows_shown_by_example(tmp_path, capsys):
    rows, tmp = doc_rows(), str(tmp_path)
    for case, call in _examples(tmp).items():
        shown = _message(call)
        if case == "max-tokens":  # parser.error: the message is on stderr
            shown = capsys.readouterr().err.strip().splitlines()[-1].split(": error: ")[-1]
        shown = shown.replace(f"{tmp}/missing.pt", "<path>").replace(f"{tmp}/empty", "<save_dir>").replace(f"{tmp}/old", "<save_dir>") \
            .replace(f"{tmp}/routing_probes.pt", "<save_dir>/routing_probes.pt").replace(tmp, "<save_dir>")
        assert shown == rows[case], case


def test_reshard_says_what_it_drops(caplog):
    import logging

    from fairseq_stablemoe.reshard_checkpoint import reshard_optimizer_state

    names = [f"layers.1.experts.experts.{i}.w" for i in range(8)] + ["embed.weight"]
    optim = {"state": {i: {"step": 1} for i in range(9)}, "param_groups": [{"params": list(range(9))}]}
    with caplog.at_level(logging.WARNING):
        reshard_optimizer_state(optim, names, names)
    assert doc_rows()["reshard-dropped"] in caplog.text
