"""Starts mongoeco's MongoDB wire-protocol server on a loopback port, for tests and development.

Usage: python mongoeco_server.py --port 27017 [--db PATH]   (PATH: SQLite file; default in memory)
Runs until killed. Prints "ready mongodb://HOST:PORT" once it accepts connections.
"""

import argparse
import asyncio
import logging
import signal

from mongoeco.core.bson_scalars import BsonInt64
from mongoeco.engines.sqlite import SQLiteEngine
from mongoeco.wire import _executor_validation
from mongoeco.wire.cursors import WireCursorStore
from mongoeco.wire.proxy import AsyncMongoEcoProxyServer

INT64_COUNT_FIELDS = ("skip", "limit", "batchSize")


def accept_int64_find_limits() -> None:
    """mongoeco keeps BSON int64 values wrapped, and then refuses an int64 `skip`, `limit` or
    `batchSize` in `find`. Real MongoDB accepts them, and the Rust driver always sends int64, so
    unwrap those fields as the command arrives."""
    validate = _executor_validation._validate_wire_find_like_command

    def validate_unwrapped(command_name, command_document, *args, **kwargs):
        for field in INT64_COUNT_FIELDS:
            if isinstance(command_document.get(field), BsonInt64):
                command_document[field] = command_document[field].value
        return validate(command_name, command_document, *args, **kwargs)

    _executor_validation._validate_wire_find_like_command = validate_unwrapped


def send_cursor_ids_as_int64() -> None:
    """Real MongoDB always sends `cursor.id` as int64 and the Rust driver insists on it;
    mongoeco sends a plain (int32) 0. Wrap the id so it is encoded as int64."""

    def wrap(method):
        def wrapped(self, *args, **kwargs):
            result = method(self, *args, **kwargs)
            cursor = result.get("cursor") if isinstance(result, dict) else None
            if isinstance(cursor, dict) and isinstance(cursor.get("id"), int):
                cursor["id"] = BsonInt64(cursor["id"])
            return result

        return wrapped

    WireCursorStore.materialize_command_result = wrap(WireCursorStore.materialize_command_result)
    WireCursorStore.get_more = wrap(WireCursorStore.get_more)


async def serve(host: str, port: int, path: str) -> None:
    server = AsyncMongoEcoProxyServer(engine=SQLiteEngine(path), host=host, port=port)
    address = await server.start()
    print(f"ready mongodb://{address.host}:{address.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=27017)
    parser.add_argument("--db", default=":memory:")
    args = parser.parse_args()
    accept_int64_find_limits()
    send_cursor_ids_as_int64()
    asyncio.run(serve(args.host, args.port, args.db))


if __name__ == "__main__":
    main()
