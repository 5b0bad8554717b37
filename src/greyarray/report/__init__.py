"""HTML reports: one self-contained file per participant and one for the group.

``participant_report`` draws each of a participant's maps; ``group_report`` summarises every
scalar of the group HDF5 files (cohort, coverage, mean/SD, subjects unlike the others, carpet)
and every analysis in their ``results/`` groups, and returns the flagged subjects.

Figures use matplotlib's object API with the Agg canvas (never pyplot): headless, and the
global backend of a user's session is left alone.
"""

from greyarray.report.group import GroupInput, GroupReport, Outlier, Thresholds, group_report
from greyarray.report.participant import MapFile, participant_report
from greyarray.report.results import results_section

__all__ = [
    "GroupInput",
    "GroupReport",
    "MapFile",
    "Outlier",
    "Thresholds",
    "group_report",
    "participant_report",
    "results_section",
]
