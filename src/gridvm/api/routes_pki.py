"""The enrolment listener's app (`gridvmd --listen`, API port + 1, server TLS only): a
joining host fetches the CA (and checks its hash) and trades a one-time token and its CSR
for a certificate. Nothing else is served there."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gridvm.api.limits import BodyLimit
from gridvm.cluster import enroll
from gridvm.cluster.enroll import EnrollAnswer, EnrollRequest
from gridvm.cluster.node import ClusterNode
from gridvm.errors import GridvmError

MAX_ENROLL_BODY = 64 * 1024


def enroll_app(node: ClusterNode) -> Any:
    from gridvm.api.app import status_for

    app = FastAPI(title="gridvmd enrolment", openapi_url=None, docs_url=None, redoc_url=None)

    @app.exception_handler(GridvmError)
    async def _error(_: Request, exc: GridvmError) -> JSONResponse:
        return JSONResponse({"error": str(exc), "type": type(exc).__name__},
                            status_code=status_for(exc))

    @app.get("/v1/pki/ca")
    async def ca() -> dict[str, str]:
        return {"ca": node.files.identity.ca.read_text()}

    @app.post("/v1/pki/enroll")
    async def enroll_member(req: EnrollRequest) -> EnrollAnswer:
        cfg, cluster = node.need()

        def run() -> EnrollAnswer:
            urls = [u for m in cluster.etcd.members() for u in m.get("clientURLs") or []]
            return enroll.enroll(cluster, req, ",".join(urls) or cfg.etcd)

        return await asyncio.to_thread(run)

    return BodyLimit(app, MAX_ENROLL_BODY)
