"""``--format aliccp-rechub-csv``: torch-rechub's processed Ali-CCP CSVs.

What the files are (checked against datawhalechina/torch-rechub,
``examples/ranking/data/ali-ccp/preprocess_ali_ccp.py`` and the ``ali_ccp_{train,val,test}_sample.csv``
files next to it): comma-separated, one header line
``click,purchase,101,121,...,301,109_14,110_14,127_14,150_14,D109_14,...,D853``, no index column
(written with ``index=False``), ``\\n`` line ends. The 23 sparse columns are label-encoded ids
(ids seen >= 10 times on train get 1..V, the rest 0); the 8 ``D*`` columns are the feature values
(the number after ``\\x03``) of fields 109_14, 110_14, 127_14, 150_14, 508, 509, 702, 853, min-max
scaled to [0, 1] over train+val+test (``0.4734``, ``0.12212999999999999``). Rows with
``click=0, purchase=1`` were dropped by the script (the writer rejects any that remain);
``purchase`` is the conversion label. The script's val and test files are the two halves of the
official test set.

Reading: columns by header name (any order; extra columns such as a pandas index are ignored),
rules of :mod:`~ctnocvr_rec.data.formats.delimited`. The raw ids are kept as they are (the writer
builds its own train vocabulary over them); field ``101`` (user id) is also the row's user id.
Dense values are stored as read (schema ``aliccp_rechub``: no transform; they are already scaled).
"""

from __future__ import annotations

from ctnocvr_rec.data.formats.delimited import CsvFormat

SPARSE_COLUMNS = (
    "101", "121", "122", "124", "125", "126", "127", "128", "129", "205", "206", "207", "210", "216",
    "508", "509", "702", "853", "301", "109_14", "110_14", "127_14", "150_14",
)
DENSE_COLUMNS = ("D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853")
DEFAULT_SCHEMA = "aliccp_rechub"


FORMAT = CsvFormat(
    "aliccp-rechub-csv",
    "torch-rechub's processed Ali-CCP CSVs (click,purchase,101,...,D853; 23 ids + 8 dense)",
    DEFAULT_SCHEMA,
)
