"""Downloads by signed URL (`bios.server.signing`), for clients that fetch files with a plain
GET and no API key. The files of an external weights checkpoint (`save_weights_external`: its
PEFT adapter) are served here, at `/v1/downloads/TOKEN/FILE`, to the native client and the Tinker SDK alike.
"""

from __future__ import annotations

import datetime

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from bios.errors import NotFoundError
from bios.server.service import Service
from bios.server.signing import DownloadSigner
from bios.server.state import ServerStateDep
from bios.types import ExternalWeightsUrls

router = APIRouter()


def external_weights_urls(
    service: Service, signer: DownloadSigner, request: Request, owner: str, path: str
) -> ExternalWeightsUrls:
    """Signed URLs of the files of `owner`'s external weights checkpoint `path` (Bios path),
    valid for `signing.URL_LIFETIME_S`; NotFoundError if it is not `owner`'s."""
    files = service.engine.store.external_files(service.check_checkpoint(owner, path))
    token, expires = signer.token(path)
    return ExternalWeightsUrls(
        urls={name: str(request.url_for("download", token=token, file=name)) for name in files},
        expires=datetime.datetime.fromtimestamp(expires, datetime.UTC),
    )


@router.get("/v1/downloads/{token}/{file:path}", name="download")
def download(token: str, file: str, state: ServerStateDep) -> FileResponse:
    """File `file` of the external weights checkpoint that `token` grants."""
    files = state.service.engine.store.external_files(state.signer.path(token))
    if file not in files:
        raise NotFoundError(f"file: the checkpoint has no file {file!r}; it has {sorted(files)}", field="file")
    return FileResponse(files[file], media_type="application/octet-stream")
