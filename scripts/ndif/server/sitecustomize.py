"""Run at the start of every local NDIF server process (it is on their PYTHONPATH).

ndif 0.1.2 logs each request's `api_key` as a structured field at INFO (in the API, the
dispatcher and the model actors), so a key would land in the server's log files. This makes
every log record carry a masked key instead. (A lab running ndif should do the same, or log at
WARNING: see docs/ndif.md.)
"""

import logging

_make_record = logging.Logger.makeRecord


def _masked_record(self, *args, **kwargs):
    record = _make_record(self, *args, **kwargs)
    if getattr(record, "api_key", None):
        record.api_key = "********"
    return record


logging.Logger.makeRecord = _masked_record
