"""``--format aliccp-aitm-csv``: the Ali-CCP files written by AITM's preprocessing.

What the files are (checked against xidongbo/AITM, ``process_public_dataset.py`` which writes them and
``AITM.py`` whose ``iterator`` reads them): ``data/ctr_cvr.train``, ``ctr_cvr.dev`` (a random 10% of
the official train rows) and ``ctr_cvr.test``; comma-separated, ``\\n`` line ends, one header line
``click,purchase,101,121,122,124,125,126,127,128,129,205,206,207,216,508,509,702,853,301`` (the
reader skips it with ``readline()``), then ``click,purchase`` and the 18 label-encoded field ids
(ids seen more than 10 times on train get 1..V, the rest 0), all plain integers. No dense values;
field 210 and the ``*_14`` fields are not in it. Rows with ``click=0, purchase=1`` were dropped by the
script (the writer rejects any that remain).

Reading: as :mod:`.aliccp_rechub_csv` (columns by header name, extra columns ignored); schema
``aliccp_aitm``; field ``101`` is also the row's user id. Pass ``--valid ctr_cvr.dev`` to keep AITM's
split, or leave it out to carve valid from train.
"""

from __future__ import annotations

from ctnocvr_rec.data.formats.delimited import CsvFormat

SPARSE_COLUMNS = (
    "101", "121", "122", "124", "125", "126", "127", "128", "129", "205", "206", "207", "216",
    "508", "509", "702", "853", "301",
)

FORMAT = CsvFormat(
    "aliccp-aitm-csv",
    "AITM's processed Ali-CCP files ctr_cvr.{train,dev,test} (click,purchase + 18 ids)",
    "aliccp_aitm",
)
