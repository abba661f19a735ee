"""The docstrings' `Example:` sections run (as keras-hub's docstring_test does)."""

import doctest
import importlib
import pkgutil

import keras
import numpy as np
import pytest
import tensorflow as tf

import dp_bitfit_keras as dpk

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(dpk.__path__, prefix="dp_bitfit_keras.")
    if not info.name.rsplit(".", 1)[-1].startswith("_")
)


def test_every_public_module_is_collected():
    assert "dp_bitfit_keras.privacy.ledger" in MODULES and "dp_bitfit_keras.model" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    globs = dict(vars(module), keras=keras, tf=tf, np=np, dpk=dpk)
    for test in finder.find(module, name, globs=globs):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (output above)"
