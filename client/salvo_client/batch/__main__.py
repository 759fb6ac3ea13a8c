"""`python -m salvo_client.batch`: `salvo batch` from the light client, against `--url`."""

from salvo_client.batch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
