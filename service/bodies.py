"""Request bodies: Litestar's ``Request`` with loraswap's JSON depth limit in front of its decoder.

Litestar decodes JSON bodies with msgspec, which raises ``RecursionError`` (a 500) on deeply nested
input; ``CheckedRequest.json`` scans the raw body first (``basemodel.jsonlimits``) and refuses it with
422 ``json_too_deep``. Routes that read their body themselves use ``basemodel.jsonlimits.loads``.
"""

from __future__ import annotations

from typing import Any

from litestar import Request

from basemodel.jsonlimits import check_json_depth


class CheckedRequest(Request[Any, Any, Any]):
    async def json(self) -> Any:
        check_json_depth(await self.body(), what="the request body", field="body")
        return await super().json()
