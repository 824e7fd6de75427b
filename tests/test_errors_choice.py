"""Contract: an unknown choice is one line, ``unknown WHAT 'VALUE'; choose one of A, B, C``, from one helper
(``errors.check_choice``). The expected texts are written out here, as a user reads them (the golden CLI outputs
and the docs quote them): a helper that drops a quote, a suffix or the prefix changes what every command prints.
"""
import argparse

import pytest

from mulocal.errors import ConfigError, check_choice, choice_error


# ------------------------------------------------------------------------------------------ the helper
def test_a_known_value_comes_back_unchanged():
    assert check_choice("loss", "mse", ("ce", "mse")) == "mse"
    assert check_choice("activation", "relu", {"tanh": 1, "relu": 2}) == "relu"  # a dict: its keys
    assert check_choice("experiment", "all", ("fig3",), also=("all",)) == "all"


@pytest.mark.parametrize("kwargs, message", [
    ({}, "unknown loss 'l1'; choose one of ce, mse"),
    ({"hint": "KIND:TARGET"}, "unknown loss 'l1'; choose one of ce, mse (KIND:TARGET)"),
    ({"where": "in --log l1:x"}, "unknown loss 'l1' in --log l1:x; choose one of ce, mse"),
    ({"prefix": "parameterization 'p'"}, "parameterization 'p': unknown loss 'l1'; choose one of ce, mse"),
    ({"also": ("all",)}, "unknown loss 'l1'; choose one of ce, mse, or all"),
    ({"where": "for a zoo net", "hint": "h"}, "unknown loss 'l1' for a zoo net; choose one of ce, mse (h)"),
])
def test_the_message_of_each_variant(kwargs, message):
    with pytest.raises(ConfigError) as err:
        check_choice("loss", "l1", ("ce", "mse"), **kwargs)
    assert str(err.value) == message
    assert str(choice_error("loss", "l1", ("ce", "mse"), **kwargs)) == message


def test_the_value_as_repr_and_the_choices_in_their_given_order():
    """``as_repr`` keeps datafiles.py's quoting (a name with a quote in it is shown as Python writes it)."""
    with pytest.raises(ConfigError, match=r"""^unknown dataset "it's"; choose one of b, a$"""):
        check_choice("dataset", "it's", ("b", "a"), as_repr=True)
    with pytest.raises(ConfigError, match=r"^unknown dataset 'x'; choose one of a, b$"):
        check_choice("dataset", "x", sorted({"b": 0, "a": 1}))


def test_another_exception_class_for_argparse():
    with pytest.raises(argparse.ArgumentTypeError) as err:
        check_choice("experiment", "fig9", ("fig3", "fig8"), also=("all",), error=argparse.ArgumentTypeError)
    assert str(err.value) == "unknown experiment 'fig9'; choose one of fig3, fig8, or all"


# ------------------------------------------------------------------------------------------ real entry points
def _message(fn) -> str:
    with pytest.raises(ConfigError) as err:
        fn()
    return str(err.value)


def test_preset_names_its_presets_sorted_and_the_name_as_given():
    from mulocal.param import preset
    assert _message(lambda: preset("MuP-x")) == "unknown parameterization preset 'MuP-x'; choose one of gnt, mup, " \
                                               "mup-bl1, sp"
    assert _message(lambda: preset("mup", "adamw")) == (
        "unknown optimizer 'adamw'; choose one of sgd, adam (AdamW is Adam with decoupled weight decay: "
        "--optimizer adam --weight-decay-mode decoupled)")
    assert _message(lambda: preset("mup", "lion")) == "unknown optimizer 'lion'; choose one of sgd, adam"


def test_a_parameterization_prefixes_its_name():
    from mulocal.param import Parameterization
    assert _message(lambda: Parameterization(name="p1", optimizer="rmsprop")) == (
        "parameterization 'p1': unknown optimizer 'rmsprop'; choose one of sgd, adam")
    assert _message(lambda: Parameterization().rule("middle", 4, 64)) == (
        "unknown layer role 'middle'; choose one of input, hidden, output")


def test_make_algo_and_the_rules_options():
    from mulocal.algos import make_algo
    assert _message(lambda: make_algo("ep")) == "unknown algorithm 'ep'; choose one of bp, dtp, gnt, pc, tp"
    assert _message(lambda: make_algo("pc", inference="magic")) == (
        "unknown inference 'magic'; choose one of auto, sequential, parallel, error, mupc")
    assert _message(lambda: make_algo("dtp", feedback="x")) == (
        "unknown feedback 'x'; choose one of trainable, linear, ridge, inverse")


def test_load_dataset_quotes_the_name_as_python_does():
    from mulocal.data import load_dataset
    assert _message(lambda: load_dataset("imagenet")) == (
        "unknown dataset 'imagenet'; choose one of fashion-mnist, mnist, cifar10, synthetic")
    assert _message(lambda: load_dataset("it's")) == (
        "unknown dataset \"it's\"; choose one of fashion-mnist, mnist, cifar10, synthetic")


def test_losses_at_the_check_and_at_the_dispatch():
    import torch
    from mulocal.losses import check_loss, loss_and_grad
    assert _message(lambda: check_loss("l1")) == "unknown loss 'l1'; choose one of ce, mse"
    assert _message(lambda: loss_and_grad(torch.zeros(1, 2, 3), torch.zeros(2, dtype=torch.long), "l1")) == (
        "unknown loss 'l1'; choose one of ce, mse")


def test_optimizer_and_weight_decay_mode():
    from mulocal.optim import LayerwiseOptimizer, check_hyper
    from mulocal.train import TrainConfig
    assert _message(lambda: LayerwiseOptimizer([], [], [0.1], kind="adamw")) == (
        "unknown optimizer 'adamw'; choose one of sgd, adam")
    assert _message(lambda: TrainConfig(optimizer="rmsprop")) == "unknown optimizer 'rmsprop'; choose one of sgd, adam"
    assert _message(lambda: check_hyper(1e-8, 0.0, "x")) == (
        "unknown weight decay mode 'x'; choose one of l2, decoupled (decoupled with adam: AdamW)")


def test_a_log_flag_says_where_and_how():
    from mulocal.loggers import parse_spec
    assert _message(lambda: parse_spec("foo:bar")) == (
        "unknown logger 'foo' in --log foo:bar; choose one of jsonl, tensorboard, mlflow, wandb (KIND:TARGET)")


def test_a_zoo_net_and_a_run_description():
    from mulocal import zoo
    from mulocal.config import default_cell, validate
    assert _message(lambda: zoo.factory("vgg9", (1, 28, 28))) == "unknown zoo architecture 'vgg9'; choose one of " \
                                                                "vgg5, vgg7"
    assert _message(lambda: zoo.factory("vgg5", (1, 28, 28), activation="swish")) == (
        "unknown activation 'swish' for a zoo net; choose one of tanh, relu, linear, gelu, hardtanh")
    assert _message(lambda: validate(default_cell(optimizer="adamw"))) == (
        "unknown optimizer 'adamw'; choose one of sgd, adam (AdamW is Adam with decoupled weight decay: "
        "--optimizer adam --weight-decay-mode decoupled)")


def test_the_command_line_keeps_argparse_s_line(capsys):
    from mulocal.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(["reproduce", "fig99"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "mulocal: error: argument NAME: unknown experiment 'fig99'; choose one of fig1-left, fig1-right, fig7, cnn, "
        "fig3, fig8, table1, depth, or all (see `mulocal reproduce --help`)")


def test_nets_build_names_what_it_builds():
    from mulocal.nets import build
    from mulocal.param import preset
    with pytest.raises(ConfigError) as err:
        build("foo", (4,), 10, 8, preset("sp"))
    assert str(err.value) == "unknown architecture 'foo'; choose one of mlp, cnn, resmlp, rescnn"
    with pytest.raises(ConfigError) as err:
        build("vgg5", (1, 28, 28), 10, 8, preset("sp"))
    assert str(err.value) == ("architecture 'vgg5' is a zoo net: build it with zoo.factory and adapter.ModuleNet "
                              "(as config.Run.build_net does)")
    with pytest.raises(ConfigError) as err:
        build("mlp", (4,), 10, 8, preset("sp"), activation="elu")
    assert str(err.value) == "unknown activation 'elu'; choose one of tanh, relu, linear"
