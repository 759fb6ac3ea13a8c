"""`salvo batch`: offline batch inference against a v2 server, resumable.

Rows come from a file (.npy, .npz, JSONL, CSV, Parquet) or a folder of images, are
converted to the model's inputs as its metadata describes them, and go out in batches over
one ModelStreamInfer stream with a window of requests in flight. Answers are journalled
durably as they arrive, so a rerun of the same command after a crash, a kill or Ctrl-C
scores only what is missing; once every row is in, the outputs are written beside the
input in its format, in input order, keyed by row id.

    salvo batch mlp rows.npy --url 127.0.0.1:8001          # -> rows.out.npz
    salvo batch digits scans/ --model-repository models/   # in-process server -> scans.out.jsonl

The modules, in the order a job uses them: `model` (the model as the server describes it),
`sources` and `images` (readers per format), `rows` (rows, their grouping into batches),
`journal` (resume state), `retries` and `runner` (sending, retrying, committing), `sinks`
(writers per format), `progress` (the bar and the summary), `job` (one job, start to end)
and `cli` (the command line). It needs grpcio, protobuf and numpy; Parquet needs pyarrow,
images Pillow, the progress bar rich (`pip install 'salvo[batch]'`), each imported only
where used.
"""

from salvo_client.batch.cli import LocalServer, add_parser, build_parser, main, run_command
from salvo_client.batch.errors import BatchError
from salvo_client.batch.job import (
    EXIT_OK,
    EXIT_ROW_ERRORS,
    EXIT_STOPPED,
    EXIT_USAGE,
    JobOptions,
    run_job,
)

__all__ = [
    "EXIT_OK",
    "EXIT_ROW_ERRORS",
    "EXIT_STOPPED",
    "EXIT_USAGE",
    "BatchError",
    "JobOptions",
    "LocalServer",
    "add_parser",
    "build_parser",
    "main",
    "run_command",
    "run_job",
]
