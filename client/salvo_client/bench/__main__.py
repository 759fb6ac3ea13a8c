"""`python -m salvo_client.bench`: the same command as `salvo bench`."""

import os
import sys

from salvo_client.bench.cli import GRPC_EXPERIMENTS, main

if __name__ == "__main__":
    if "GRPC_EXPERIMENTS" not in os.environ:
        # grpc, imported with this package, has read the environment already: start again.
        os.environ["GRPC_EXPERIMENTS"] = GRPC_EXPERIMENTS
        os.execv(sys.executable, [sys.executable, "-m", "salvo_client.bench", *sys.argv[1:]])
    raise SystemExit(main())
