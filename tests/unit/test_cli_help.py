"""What the command line shows a user (issue 15, "Errors, help, warnings"): `sslscale --help`
with a clean description, every argument explained and its default shown, `--version`, and no
third-party warning noise."""

import argparse
import subprocess

import pytest

import sslscale
from launcher.cli import build_parser, main

from ..conftest import ROOT, sslscale_cmd


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _parsers(parser: argparse.ArgumentParser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, (*path, name))


def test_version():
    proc = subprocess.run(sslscale_cmd("--version"), cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout == f"sslscale {sslscale.__version__}\n"


def test_top_level_help_is_one_clean_sentence_and_lists_the_commands(capsys):
    out = _help(capsys)
    assert "`" not in out and "``" not in out
    description = out.split("\n\n")[1]  # after the usage line
    assert description.rstrip().endswith(".") and description.count(".") == 1
    epilog = out.split("--version")[-1]
    for command in ("data prepare", "train", "launch", "submit", "eval knn", "mlm", "export", "push"):
        assert command in epilog


def test_data_plan_help_shows_defaults(capsys):
    out = " ".join(_help(capsys, "data", "plan").split())
    assert "data-loader workers per rank, as key data.num_workers (default: 2)" in out
    assert "(default: 8)" in out and "(default: 64)" in out


@pytest.mark.parametrize("argv, needle", [
    (("data", "prepare"), "--split {train,test} which split of fashion-mnist / mnist5k to write (default: train)"),
    (("data", "prepare"), "(default: png)"),
    (("eval", "knn"), "--k K neighbours that vote (default: run's eval.k)"),
    (("eval", "mlm"), "--max-test-samples MAX_TEST_SAMPLES first N held-out blocks"),
    (("ckpt", "info"), "run_dir the run's directory"),
])
def test_sub_command_help_explains_its_arguments(capsys, argv, needle):
    assert needle in " ".join(_help(capsys, *argv).split())


def test_every_argument_has_help_and_every_default_is_shown():
    for path, parser in _parsers(build_parser()):
        text = " ".join(parser.format_help().split())
        assert "`" not in text, path
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                                   argparse._SubParsersAction)):
                continue
            assert action.help, (path, action.dest)
            if action.option_strings and action.default is not None and action.default is not False:
                assert f"(default: {action.default})" in text, (path, action.dest)


def test_deepspeeds_deprecation_noise_is_filtered_and_nothing_else():
    """DeepSpeed calls ``all_gather_into_tensor``, which torch 2.13 deprecates (100+ lines in a
    2-rank run); ``filter_known_warnings`` (called by ``engine.init_distributed``) hides that one."""
    import warnings

    import torch.distributed

    from sslscale.metrics import filter_known_warnings

    noise = getattr(torch.distributed.all_gather_into_tensor, "__deprecated__",
                    "`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                    "`torch.distributed.all_gather_single` instead.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filter_known_warnings()
        for _ in range(3):
            warnings.warn(noise, FutureWarning)
        warnings.warn("`torch.distributed.reduce_op` is deprecated", FutureWarning)
        warnings.warn(noise, UserWarning)  # another category is not the known noise
    assert [(w.category, str(w.message)) for w in caught] == [
        (FutureWarning, "`torch.distributed.reduce_op` is deprecated"), (UserWarning, noise)]
