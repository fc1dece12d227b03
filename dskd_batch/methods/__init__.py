"""The distillation methods and their registry, the extension point for new ones.

:mod:`~dskd_batch.methods.same_vocab` holds the methods for a student of the teacher's tokenizer
(SFT, SeqKD, KD, DSKD) and the :class:`Method` interface; :mod:`~dskd_batch.methods.cross_vocab`
those for a student of another tokenizer (DSKD-ETA, DSKD-CMA, MinED, ULD, GOLD, ALM). ``METHOD_CLASSES`` (name ->
class) is the one registry; installed plug-ins join it through the entry-point group
``dskd_batch.methods`` (:func:`method_classes`). Stage two builds a method by name with
:func:`make_method`; the configs check names against the registry.
"""

from __future__ import annotations

from typing import Any

from ..losses import with_plugins
from .cross_vocab import ALM, DSKDCMA, DSKDETA, GOLD, ULD, CrossBatch, CrossVocabMethod, MinED, gold_distance, uld_distance
from .same_vocab import (DSKD, KD_GRAD, LossInputs, LossSettings, Method, SeqKD, TeacherBatch, TeacherHead, VanillaKD,
                         dskd_terms, kd_or_label)

__all__ = ["METHOD_CLASSES", "method_classes", "make_method", "method_info", "Method", "LossSettings", "LossInputs",
           "SeqKD", "VanillaKD", "DSKD", "DSKDETA", "DSKDCMA", "MinED", "ULD", "GOLD", "ALM", "gold_distance", "CrossBatch", "CrossVocabMethod",
           "TeacherBatch", "TeacherHead", "KD_GRAD", "dskd_terms", "kd_or_label", "uld_distance"]

METHOD_CLASSES: dict[str, type[Method]] = {"sft": Method, "seqkd": SeqKD, "kd": VanillaKD, "dskd": DSKD,
                                           "dskd-eta": DSKDETA, "dskd-cma": DSKDCMA, "mined": MinED, "uld": ULD,
                                           "gold": GOLD, "alm": ALM}


def method_classes() -> dict[str, type[Method]]:
    """The method registry, installed plug-ins (entry points ``dskd_batch.methods``: name -> Method
    subclass) included."""
    return with_plugins("dskd_batch.methods", METHOD_CLASSES)


def make_method(name: str, ls: LossSettings) -> Method:
    return method_classes()[name](ls)


def method_info(m: Method) -> dict[str, Any]:
    return {"name": m.name, **m.ls.__dict__}
