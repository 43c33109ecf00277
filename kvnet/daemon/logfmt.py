"""JSON-lines log records for kvnet-node (`log.format = "json"`), on kvnet.logs' one stderr handler.

kvnet.logs owns the handler, its level and its rate limit; this only swaps the formatter, so a JSON
node gets the same filtering as every other kvnet command.
"""

from __future__ import annotations

import json
import logging
import time


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (unix s), level, logger, msg, and exc when there is a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        obj = {"ts": round(record.created, 3), "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False)


def use_json() -> None:
    for handler in logging.getLogger().handlers:
        handler.setFormatter(JsonFormatter())
