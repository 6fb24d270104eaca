"""One error root: every exception class peerd defines derives from ``PeerdError``, and the tree
drawn in ``peerd.errors``' docstring names each of them.

"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Iterator

import peerd
from peerd import errors
from peerd.errors import PeerdError

OUTSIDE = {
    # A signal inside argparse, caught in ctl.light_args: it never leaves the function.
    "peerd.ctl._ParseError",
    # A job's "wait for the others", caught in Replicator.execute: not a failure.
    "peerd.replication.service.Deferred",
    # The R2 client's own, turned into R2Error (replication.r2) before anything else sees them.
    "peerd.replication.s3http.HttpStatusError",
    "peerd.replication.s3http.LocalMismatch",
}


def _exception_classes() -> Iterator[tuple[str, type[BaseException]]]:
    for info in pkgutil.walk_packages(peerd.__path__, "peerd."):
        if info.name == "peerd.__main__":
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == module.__name__
            ):
                yield f"{module.__name__}.{name}", obj


def test_every_error_class_is_under_the_root() -> None:
    outside = {name for name, cls in _exception_classes() if not issubclass(cls, PeerdError)}
    assert outside == OUTSIDE


def test_the_drawn_tree_names_every_error_class() -> None:
    doc = errors.__doc__ or ""
    missing = [
        name
        for name, cls in _exception_classes()
        if issubclass(cls, PeerdError) and f" {cls.__name__} " not in doc
    ]
    assert missing == []


def test_retry_after_by_class_or_by_instance() -> None:
    assert errors.TooManyRequests("busy").retry_after_s == 1
    assert errors.Unavailable("down").retry_after_s == 2
    assert errors.Unavailable("producing", retry_after=7).retry_after_s == 7
    assert errors.NotFound("gone").retry_after_s is None
