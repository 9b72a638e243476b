"""Bilevel solvers: equinox Modules with `init`, `step` and `params`."""

from ._borep import BOREP as BOREP
from ._bsvrb import BSVRB as BSVRB
from ._implicit_diff import ImplicitDiff as ImplicitDiff
from ._lvhba import LVHBA as LVHBA
from ._masoba import MASOBA as MASOBA
from ._penalty import F2SA as F2SA, VPBGD as VPBGD, Penalty as Penalty
from ._saba import SABA as SABA
from ._slbamm import SLBAMM as SLBAMM
from ._soba import SOBA as SOBA
from ._srba import SRBA as SRBA
from ._unrolled import Unrolled as Unrolled
