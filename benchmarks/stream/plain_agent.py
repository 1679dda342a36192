"""The floor: a plain Faust agent that only counts records (run by benchmarks/stream/run.py).

Usage: plain_agent.py BOOTSTRAP TOPIC N APP_ID — prints {"records": N, "seconds": s} and exits once
N records went through the agent (timed from the first one).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import faust

from stream_app import faust_fixes

bootstrap, topic_name, total, app_id = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
faust_fixes.install(10)  # same fetch wait as the lossguard worker
app = faust.App(app_id, broker=f"kafka://{bootstrap}", web_enabled=False, datadir=tempfile.mkdtemp(), broker_session_timeout=3.0,
                broker_heartbeat_interval=1.0, consumer_auto_offset_reset="earliest", topic_replication_factor=1)
topic = app.topic(topic_name, key_serializer="raw", value_serializer="raw")


@app.agent(topic)
async def count(stream):
    seen, start = 0, 0.0
    async for _ in stream:
        seen += 1
        if seen == 1:
            start = time.perf_counter()
        if seen == total:
            print(json.dumps({"records": total, "seconds": time.perf_counter() - start}), flush=True)
            os._exit(0)


if __name__ == "__main__":
    sys.argv = [sys.argv[0], "worker", "-l", "warn"]
    app.main()
