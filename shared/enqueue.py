"""What a group of new jobs needs from Redis once their insert committed, in one script call: each job's
stream event and place in its queue's position set (`events.created_in`), its run message and the marker
that it was sent (`broker.publish_in`), then each one's place in line (`job_view.place_commands`).

As a pipeline that was seven commands per job, and redis-py spends its Python per command: packing each,
then parsing and post-processing each reply. In bench.api that was about a fifth of the API's event-loop
time on POST /v1/jobs. A script takes the group's keys and arguments as two flat lists and answers only
the places. Redis runs it as one command, so no worker can pop a job between its LPUSH and the count of
the jobs ahead of it either; the counts are taken after the whole group entered the sets, as the
pipeline's were.
"""

from __future__ import annotations

import json
from typing import Any

from shared import broker, events, positions
from shared.job_view import eta_key
from shared.settings import get_settings
from shared.tables import Job

KEYS_PER_JOB = 5  # stream, position set, queue list, published marker, the model's average run time
ARGS_PER_JOB = 4  # id, score, event data, run message

SCRIPT = (
    positions.AHEAD_OF
    + f"""
local n = #KEYS / {KEYS_PER_JOB}
local maxlen, stream_ttl, marker_ttl = ARGV[1], ARGV[2], ARGV[3]
for i = 0, n - 1 do
  local k, a = i * {KEYS_PER_JOB}, 3 + i * {ARGS_PER_JOB}
  redis.call('XADD', KEYS[k + 1], 'MAXLEN', '~', maxlen, '*', 'type', 'queued', 'data', ARGV[a + 3])
  redis.call('EXPIRE', KEYS[k + 1], stream_ttl)
  redis.call('ZADD', KEYS[k + 2], ARGV[a + 2], ARGV[a + 1])
  redis.call('LPUSH', KEYS[k + 3], ARGV[a + 4])
  redis.call('SET', KEYS[k + 4], 1, 'EX', marker_ttl)
end
local places = {{}}
for i = 0, n - 1 do
  local k, a = i * {KEYS_PER_JOB}, 3 + i * {ARGS_PER_JOB}
  places[2 * i + 1] = ahead_of(KEYS[k + 2], ARGV[a + 2], ARGV[a + 1])
  places[2 * i + 2] = redis.call('GET', KEYS[k + 5])
end
return places
"""
)

_QUEUED = json.dumps({"status": "queued"})


def arguments(new: list[Job]) -> tuple[list[str], list[Any]]:
    """The script's keys and arguments for `new`, in order."""
    settings = get_settings()
    keys: list[str] = []
    args: list[Any] = [events.STREAM_MAXLEN, settings.event_stream_ttl, broker.PUBLISHED_MARKER_TTL]
    for job in new:
        keys += [
            events.stream_key(job.id),
            positions.key(job.queue),
            broker.queue_key(job.queue, settings),
            broker.published_key(job.id),
            eta_key(job.model),
        ]
        args += [
            job.id,
            positions.score(job.priority, job.created_at),
            _QUEUED,
            broker.run_message(job.id, job.queue, settings),
        ]
    return keys, args
