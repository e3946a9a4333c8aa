"""A Google Cloud Storage server on loopback for the tests: gcp-storage-emulator (PyPI), in memory, with
two behaviours of GCS's JSON API that it lacks and that the code under test relies on:
  - preconditions: `ifGenerationMatch` (0: the object must not exist; N: its generation must be N) on
    uploads, reads and deletes answers 412 when it does not hold, `ifGenerationNotMatch` on reads 304 when
    it does. The workdir lease's exclusive create (gcsfs, ifGenerationMatch=0) and OCDBT's manifest
    updates (TensorStore) are conditional writes;
  - downloads carry the object's generation in `x-goog-generation`, as GCS's do: TensorStore's gcs driver
    reads it ("Malformed StorageGeneration" without it).

    python tests/gcs_server.py PORT BUCKET    (serves until killed; prints "ready" once listening)

Clients find it through STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage) and TENSORSTORE_GCS_HTTP_URL
(TensorStore, with GOOGLE_AUTH_TOKEN_FOR_TESTING): `environment(port)`.
"""

from __future__ import annotations

import sys
import time
from http import HTTPStatus


def environment(port: int) -> dict:
    url = f"http://127.0.0.1:{port}"
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
            "GOOGLE_CLOUD_PROJECT": "test", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def _patch_emulator():
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    def generation(storage, bucket, name):
        try:
            return str(storage.get_file_obj(bucket, name)["generation"])
        except NotFound:
            return None

    def with_preconditions(handler, object_name):
        def wrapped(request, response, storage, *args, **kwargs):
            bucket, name = request.params.get("bucket_name"), object_name(request)
            current = generation(storage, bucket, name) if bucket and name else None
            match = (request.query.get("ifGenerationMatch") or [None])[0]
            if match is not None and ((match == "0") != (current is None) or (match != "0" and match != current)):
                response.status = HTTPStatus.PRECONDITION_FAILED
                return None
            not_match = (request.query.get("ifGenerationNotMatch") or [None])[0]
            if not_match is not None and current is not None and not_match == current:
                response.status = HTTPStatus.NOT_MODIFIED
                return None
            result = handler(request, response, storage, *args, **kwargs)
            if current is not None and request.method == "GET":
                response["x-goog-generation"] = current
            return result
        return wrapped

    by_id = lambda request: request.params.get("object_id")  # noqa: E731
    def upload_name(request):
        """An upload's object: in the query, or in a multipart upload's metadata part, or in the JSON body that
        starts a resumable one (google-cloud-storage and gcsfs use all three)."""
        name = (request.query.get("name") or [None])[0]
        kind = (request.query.get("uploadType") or [""])[0]
        if name is None and kind == "multipart":
            name = (request.data or {}).get("meta", {}).get("name")
        elif name is None and kind == "resumable" and "upload_id" not in request.query:
            name = (request.data or {}).get("name") if isinstance(request.data, dict) else None
        return name

    wrapped = {objects.get: with_preconditions(objects.get, by_id),
               objects.download: with_preconditions(objects.download, by_id),
               objects.delete: with_preconditions(objects.delete, by_id),
               objects.insert: with_preconditions(objects.insert, upload_name)}
    server.HANDLERS = tuple((regex, {method: wrapped.get(h, h) for method, h in handlers.items()})
                            for regex, handlers in server.HANDLERS)
    objects.insert = wrapped[objects.insert]  # the router's fallback for uploads without the /upload prefix
    return server


def main(port: int, bucket: str) -> None:
    server = _patch_emulator()
    s = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    s.start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
