"""Studies: a grid of runs over config values and seeds, resumable, one run directory per point,
with their results gathered into a table and a plot (``barlow sweep``, ``barlow study``)."""

from barlow.study.catalogue import Study, load_study, shipped_studies, study_from_dict, sweep_study
from barlow.study.grid import Axis, Level, Point, expand, parse_grid, parse_seeds
from barlow.study.runner import Outcome, run_study

__all__ = [
    "Axis",
    "Level",
    "Outcome",
    "Point",
    "Study",
    "expand",
    "load_study",
    "parse_grid",
    "parse_seeds",
    "run_study",
    "shipped_studies",
    "study_from_dict",
    "sweep_study",
]
