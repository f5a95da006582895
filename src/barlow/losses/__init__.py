"""Loss functions on embeddings: pure functions, float32 inside, exact across processes.

One module per family:

- :mod:`~barlow.losses.barlow_twins`: :func:`barlow_twins_loss` with its four computations and
  their cost model (:func:`choose_path`, :func:`barlow_loss_cost`). Zbontar et al., "Barlow
  Twins: Self-Supervised Learning via Redundancy Reduction", ICML 2021, arXiv:2103.03230.
- :mod:`~barlow.losses.vicreg`: :func:`vicreg_loss`. Bardes, Ponce & LeCun, "VICReg", ICLR 2022,
  arXiv:2105.04906.
- :mod:`~barlow.losses.cosine`: :func:`normalized_mse` (BYOL: Grill et al., NeurIPS 2020,
  arXiv:2006.07733) and :func:`negative_cosine` (SimSiam: Chen & He, CVPR 2021,
  arXiv:2011.10566).
- :mod:`~barlow.losses.contrastive`: :func:`nt_xent_loss` (SimCLR: Chen et al., ICML 2020,
  arXiv:2002.05709), :func:`info_nce_loss` (MoCo: He et al., CVPR 2020, arXiv:1911.05722; MoCo
  v2: arXiv:2003.04297) and :func:`multiview_info_nce_loss` (CMC: Tian et al., ECCV 2020,
  arXiv:1906.05849).
- :mod:`~barlow.losses.checks`: the input checks they share, and
  :func:`finite_checks_by_caller`, under which the losses leave the NaN/Inf check (and its host
  sync) to the caller, who checks the loss once per step.
"""

from __future__ import annotations

from barlow.losses.barlow_twins import (
    BARLOW_TWINS_COMPUTATIONS,
    BARLOW_TWINS_PATHS,
    FLOPS_PER_BYTE,
    LOSS_PATHS,
    BarlowTwinsComputation,
    BarlowTwinsLossOutput,
    BarlowTwinsPath,
    LossPath,
    barlow_loss_cost,
    barlow_twins_loss,
    choose_path,
    off_diagonal,
    standardize,
)
from barlow.losses.checks import finite_checks_by_caller
from barlow.losses.contrastive import (
    ContrastiveLossOutput,
    info_nce_loss,
    multiview_info_nce_loss,
    nt_xent_loss,
)
from barlow.losses.cosine import negative_cosine, normalized_mse
from barlow.losses.vicreg import VICRegLossOutput, vicreg_loss

__all__ = [
    "BARLOW_TWINS_COMPUTATIONS",
    "BARLOW_TWINS_PATHS",
    "FLOPS_PER_BYTE",
    "LOSS_PATHS",
    "BarlowTwinsComputation",
    "BarlowTwinsLossOutput",
    "BarlowTwinsPath",
    "ContrastiveLossOutput",
    "LossPath",
    "VICRegLossOutput",
    "barlow_loss_cost",
    "barlow_twins_loss",
    "choose_path",
    "finite_checks_by_caller",
    "info_nce_loss",
    "multiview_info_nce_loss",
    "negative_cosine",
    "normalized_mse",
    "nt_xent_loss",
    "off_diagonal",
    "standardize",
    "vicreg_loss",
]
