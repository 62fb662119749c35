"""A real tus client (tuspy, PyPI's `tuspy`) uploads one file to a server's tus endpoint and
prints one JSON line of what happened: the upload URL, the bytes the server acknowledged, each
retry and the error behind it. Exits 0 once the upload is complete, 1 if it failed, 3 if tuspy
is not installed. Used by the servers' tests.

    python3 tus_upload.py ENDPOINT FILE [--chunk-size N] [--retries N] [--retry-delay SECONDS]

--chunk-size: bytes per PATCH (default: the whole file in one PATCH); --retries: how many
times a failed PATCH is retried (after a HEAD for the offset); --retry-delay: seconds to wait
before each retry (tuspy's default is 30).
"""

import argparse
import json
import os
import sys

try:
    from tusclient import client
    from tusclient.uploader import Uploader
except ImportError as e:
    print(
        f"tuspy is not installed ({e}): python3 -m pip install -r clients/requirements.txt",
        file=sys.stderr,
    )
    sys.exit(3)


class RecordingUploader(Uploader):
    """tuspy's uploader, recording each failure it retries or gives up on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.errors = []
        self.retried = 0

    def _retry_or_cry(self, error):
        retry = self.retries > self._retried
        self.errors.append(
            {
                "message": str(error).split("\n")[0],
                "status": getattr(error, "status_code", None),
                "retry": retry,
            }
        )
        if retry:
            self.retried += 1
        super()._retry_or_cry(error)


def main():
    args = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args.add_argument("endpoint")
    args.add_argument("file")
    args.add_argument("--chunk-size", type=int, default=None)
    args.add_argument("--retries", type=int, default=0)
    args.add_argument("--retry-delay", type=float, default=30)
    a = args.parse_args()

    options = {"retries": a.retries, "retry_delay": a.retry_delay}
    if a.chunk_size is not None:
        options["chunk_size"] = a.chunk_size
    tus = client.TusClient(a.endpoint)
    uploader = RecordingUploader(
        file_path=a.file,
        client=tus,
        metadata={"filename": os.path.basename(a.file)},
        **options,
    )
    result = {"ok": False}
    try:
        uploader.upload()
        result["ok"] = uploader.offset == uploader.get_file_size()
        if not result["ok"]:
            result["error"] = f"stopped at offset {uploader.offset}"
    except Exception as e:  # noqa: BLE001 - any failure is reported, then exit 1
        result["error"] = f"{type(e).__name__}: {e}"
    result.update(
        url=uploader.url,
        bytes=uploader.offset,
        retries=uploader.retried,
        errors=uploader.errors,
    )
    print(json.dumps(result), flush=True)
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
