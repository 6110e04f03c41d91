"""Lua scripts: every state change of a message is one atomic step.

A message's `state` in its meta hash moves queued → running → done | cancelled | error, and
only these scripts move it. Writes from a worker carry (worker, attempt) and are refused
once the job belongs to someone else (fencing). Every script can be run twice with the same
arguments and answers the second time as it did the first (a call whose reply was lost with
its connection is sent again: `store.lean`).

Every key a script touches is passed in KEYS, and all of them share one hash slot (the owner's
shard tag, `store.keys`), so each script runs on one node of a Redis Cluster. Lifetimes, limits
and the publish command (SPUBLISH on a Redis 7 cluster, else PUBLISH) are a Lua table `C`
written into the script's text by `configured` (see `store.redis_store.Store`), so no call pays
for decoding them.
"""

from __future__ import annotations

from collections.abc import Mapping


def configured(script: str, config: Mapping[str, str | int]) -> str:
    """`script` with `local C = {...}` (the config as Lua constants) in front of it."""
    return f"local C = {{{', '.join(f'{name} = {_lua(value)}' for name, value in config.items())}}}\n{script}"


def _lua(value: str | int) -> str:
    if isinstance(value, int):
        return str(value)
    if not (value.isascii() and value.isprintable()) or '"' in value or "\\" in value:
        raise ValueError(f"not a plain Lua string: {value!r}")
    return f'"{value}"'


PRELUDE = r"""
-- The scripts that end a message take the keys of its end as KEYS[1..9]: meta, log, grace
-- record, cancel key, the shard's backlog, the session's active message, its history and
-- answers, the owner's generations (`store.redis_store.Store._ending_keys`).

local function save_answer(mid, text, hist_status, only_if_absent)
  if redis.call('EXISTS', KEYS[7]) == 0 then return end
  local answer = cjson.encode({text = text, status = hist_status})
  if only_if_absent then
    redis.call('HSETNX', KEYS[8], mid, answer)
  else
    redis.call('HSET', KEYS[8], mid, answer)
  end
  redis.call('EXPIRE', KEYS[8], C.hist_ttl)
end

-- `text` false: the answer's text is saved later (`save_answer`) by the worker that has it.
-- The terminal sits right after the last chunk the store accepted (`last_seq`): `head .. seq ..
-- tail` is its frame, returned. It goes into the log and out on `channel` at once, or, with
-- C.defer_end 1 (a Redis Cluster), it is kept in the meta hash
-- (`end`) and put there by END_LOG once a replica has the end, so that no reader sees an end a
-- failover could lose. `reason`: the cancel's, kept in the meta hash (nil for other ends).
local function write_terminal(mid, channel, state, head, tail, text, hist_status, grace_status, reason)
  local seq = redis.call('HGET', KEYS[1], 'last_seq') or '0'
  local frame = head .. seq .. tail
  if C.defer_end == 1 then
    redis.call('HSET', KEYS[1], 'end', frame)
  else
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', C.log_maxlen, (tonumber(seq) + 1) .. '-0', 'f', frame)
    redis.call('EXPIRE', KEYS[2], C.ended_ttl)
    redis.call(C.publish, channel, frame)
  end
  redis.call('HSET', KEYS[1], 'state', state)
  if reason then redis.call('HSET', KEYS[1], 'cancel_reason', reason) end
  redis.call('HDEL', KEYS[1], 'job')
  redis.call('EXPIRE', KEYS[1], C.ended_ttl)
  redis.call('SET', KEYS[3], grace_status, 'EX', C.grace_s)
  redis.call('DEL', KEYS[4])
  redis.call('ZREM', KEYS[5], mid)
  if redis.call('GET', KEYS[6]) == mid then redis.call('DEL', KEYS[6]) end
  if text then save_answer(mid, text, hist_status, false) end
  redis.call('ZREM', KEYS[9], mid)
  return frame
end
"""

SUBMIT = r"""
-- KEYS: meta, active, hist, answers, request (untouched when ARGV[5], the request_id, is empty),
--       the shard's jobs, attach, the shard's backlog, the user's generations
-- ARGV: mid, user, session_id, user_turn_json, request_id, job_json, now_ms, supersede, job stream entry,
--       generations limit (0: unlimited, and untracked)
-- The job (with its prompt) lives in the meta hash until the message ends; the stream entry
-- only names the message. The backlog holds the ids accepted and not yet claimed, scored by
-- acceptance time: its size is the backlog, and an id older than a message's lifetime (its
-- message expired unclaimed) is pruned here, so the count cannot drift. The user's
-- generations (queued or running) are scored by when their message key expires.
local mid, user, sid = ARGV[1], ARGV[2], ARGV[3]
if ARGV[5] ~= '' then
  local existing = redis.call('GET', KEYS[5])
  if existing then return {'dup', existing} end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'dup', mid} end
local prev = redis.call('GET', KEYS[2])
if prev and prev ~= ARGV[8] then return {'busy', prev} end
local now = tonumber(ARGV[7])
local gens_limit = tonumber(ARGV[10])
if gens_limit > 0 then
  local live = redis.call('ZCOUNT', KEYS[9], '(' .. now, '+inf')
  -- the generation this chat replaces may not have ended yet (polling baseline): not twice
  if ARGV[8] ~= '' and redis.call('ZSCORE', KEYS[9], ARGV[8]) then live = live - 1 end
  if live >= gens_limit then return {'rate_limited', ''} end
end
local stale = now - C.message_ttl * 1000
if redis.call('ZCOUNT', KEYS[8], '(' .. stale, '+inf') >= C.backlog_limit then return {'overloaded', ''} end
-- The first write is one Redis refuses at maxmemory (OOM), so a refused SUBMIT changed nothing.
redis.call('HSET', KEYS[1], 'user', user, 'session_id', sid, 'state', 'queued',
  'attempt', 0, 'last_seq', 0, 'created_ms', ARGV[7], 'request_id', ARGV[5], 'job', ARGV[6])
redis.call('EXPIRE', KEYS[1], C.message_ttl)
redis.call('SET', KEYS[2], mid, 'EX', C.message_ttl)
redis.call('RPUSH', KEYS[3], ARGV[4])
redis.call('EXPIRE', KEYS[3], C.hist_ttl)
while redis.call('LLEN', KEYS[3]) > C.hist_max do
  local old = cjson.decode(redis.call('LPOP', KEYS[3]))
  redis.call('HDEL', KEYS[4], old.message_id)
end
if ARGV[5] ~= '' then redis.call('SET', KEYS[5], mid, 'EX', C.grace_s) end
redis.call('SET', KEYS[7], '1', 'PX', C.detach_ms)
redis.call('XADD', KEYS[6], 'MAXLEN', '~', C.jobs_maxlen, '*', 'm', ARGV[9])
redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', stale)
redis.call('ZADD', KEYS[8], now, mid)
redis.call('PEXPIRE', KEYS[8], C.message_ttl * 1000)
if gens_limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', now)
  redis.call('ZADD', KEYS[9], now + C.message_ttl * 1000, mid)
  redis.call('PEXPIRE', KEYS[9], C.message_ttl * 1000)
end
return {'ok', mid}
"""

CANCEL = PRELUDE + r"""
-- KEYS: the keys of the message's end (PRELUDE)
-- ARGV: mid, user, session_id, reason, the `cancelled` frame split around its seq (head, tail),
--       live channel
-- Returns {status, the worker to push the cancel to or '', the terminal frame written or ''}.
-- A running message ends here, at its last stored seq: the store is the authority, so the
-- client's `cancelled` does not wait for the worker. The cancel key and the push then stop
-- the worker, whose later writes are refused (state is no longer running). With
-- C.cancel_ends 0 (the polling baseline of the benchmarks) only the key is set.
local mid = ARGV[1]
local m = redis.call('HMGET', KEYS[1], 'user', 'state', 'worker', 'session_id')
if m[1] ~= ARGV[2] or m[4] ~= ARGV[3] then return {'not_found', '', ''} end
local grace = redis.call('GET', KEYS[3])
if grace then return {'already_' .. grace, '', ''} end
if m[2] == 'queued' then
  local frame = write_terminal(mid, ARGV[7], 'cancelled', ARGV[5], ARGV[6], '', 'cancelled', 'cancelled', ARGV[4])
  return {'cancelling', '', frame}
elseif m[2] == 'running' then
  local frame = ''
  if C.cancel_ends == 1 then
    frame = write_terminal(mid, ARGV[7], 'cancelled', ARGV[5], ARGV[6], false, 'cancelled', 'cancelled', ARGV[4])
  end
  if redis.call('SET', KEYS[4], ARGV[4], 'NX', 'EX', C.message_ttl) then
    return {'cancelling', m[3], frame}
  end
  return {'cancelling', '', frame}
end
return {'not_found', '', ''}
"""

CLAIM = r"""
-- KEYS: meta, the shard's backlog; ARGV: worker, now_ms, mid
-- The id leaves the backlog whatever its state: a message that expired or ended while queued
-- is no longer waiting either.
redis.call('ZREM', KEYS[2], ARGV[3])
local m = redis.call('HMGET', KEYS[1], 'state', 'job', 'worker', 'attempt')
if not m[1] then return {'gone', 0, ''} end
if m[1] == 'running' and m[3] == ARGV[1] and m[2] then return {'run', tonumber(m[4]), m[2]} end
if m[1] ~= 'queued' or not m[2] then return {'skip', 0, ''} end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[1], 'claimed_ms', ARGV[2])
return {'run', attempt, m[2]}
"""

TAKEOVER = r"""
-- A dead worker's running job moves to this worker. KEYS: meta; ARGV: dead worker, new worker
local m = redis.call('HMGET', KEYS[1], 'state', 'worker', 'last_seq', 'job', 'attempt')
if m[1] == 'running' and m[2] == ARGV[2] and m[4] then return {'run', tonumber(m[5]), tonumber(m[3]), m[4]} end
if m[1] ~= 'running' or m[2] ~= ARGV[1] or not m[4] then return {'skip', 0, 0, ''} end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'worker', ARGV[2])
return {'run', attempt, tonumber(m[3]), m[4]}
"""

APPEND = r"""
-- KEYS: meta, log; ARGV: worker, attempt, seq, frame, live channel
-- Returns 1 (written), 2 (refused: the message was cancelled, stop), 0 (refused: not ours),
-- {3, last_seq} (refused: not the next seq; the chunks after last_seq are missing: an earlier
-- write was refused, or a failover lost writes the old master had acknowledged; resend them
-- in order).
-- A seq already written is answered 1 and not written again: a worker resends its batch when
-- the connection dropped before the replies came back.
local m = redis.call('HMGET', KEYS[1], 'worker', 'attempt', 'state', 'last_seq')
if m[1] ~= ARGV[1] or m[2] ~= ARGV[2] then return 0 end
if m[3] ~= 'running' then
  if m[3] == 'cancelled' then return 2 end
  return 0
end
local last = tonumber(m[4] or '0')
local seq = tonumber(ARGV[3])
if seq <= last then return 1 end
if seq ~= last + 1 then return {3, last} end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', C.log_maxlen, ARGV[3] .. '-0', 'f', ARGV[4])
if ARGV[3] == '1' then redis.call('EXPIRE', KEYS[2], C.message_ttl) end
redis.call('HSET', KEYS[1], 'last_seq', ARGV[3])
redis.call(C.publish, ARGV[5], ARGV[4])
return 1
"""

FINISH = PRELUDE + r"""
-- KEYS: the keys of the message's end (PRELUDE)
-- ARGV: mid, worker, attempt, state, frame head, frame tail, text, history status,
--       grace status, cancelled frame head, cancelled frame tail (frames split at their seq),
--       live channel
-- Returns {1, frame} (ended as asked), {2, frame} (ended cancelled instead), {3, frame} (the
-- store had already ended it cancelled: only the answer's text is saved; the frame, when its
-- end is still deferred), {0, ''} (not ours); the frame is the terminal's (also when a repeated
-- call finds the message ended as asked).
-- A cancel answered `cancelling` promises a `cancelled` terminal: if its key is set when a
-- job finishes on its own (the Stop raced the last token), the message ends cancelled.
local m = redis.call('HMGET', KEYS[1], 'worker', 'attempt', 'state', 'last_seq')
if m[1] ~= ARGV[2] or m[2] ~= ARGV[3] then return {0, ''} end
if m[3] == 'cancelled' then
  save_answer(ARGV[1], ARGV[7], 'cancelled', true)
  redis.call('DEL', KEYS[4])
  return {3, redis.call('HGET', KEYS[1], 'end') or ''}
end
if m[3] == ARGV[4] then return {1, ARGV[5] .. m[4] .. ARGV[6]} end
if m[3] ~= 'running' then return {0, ''} end
if ARGV[4] == 'done' and redis.call('EXISTS', KEYS[4]) == 1 then
  return {2, write_terminal(ARGV[1], ARGV[12], 'cancelled', ARGV[10], ARGV[11], ARGV[7], 'cancelled', 'cancelled', nil)}
end
return {1, write_terminal(ARGV[1], ARGV[12], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], nil)}
"""

END_LOG = r"""
-- KEYS: meta, log; ARGV: live channel, and optionally a state: only an end of that state
-- A deferred end (write_terminal with C.defer_end 1) goes into the log, after the last chunk,
-- and out on the live channel. Returns 1, or 0 when there is no deferred end (of that state).
-- Run again, it adds nothing to the log (and publishes again: relays drop a terminal they
-- already have).
local m = redis.call('HMGET', KEYS[1], 'end', 'last_seq', 'state')
if not m[1] or (ARGV[2] and m[3] ~= ARGV[2]) then return 0 end
local position = tonumber(m[2] or '0') + 1
local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
if not top or tonumber(string.match(top[1], '^(%d+)')) < position then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', C.log_maxlen, position .. '-0', 'f', m[1])
end
redis.call('EXPIRE', KEYS[2], C.ended_ttl)
redis.call(C.publish, ARGV[1], m[1])
return 1
"""

SAVE_ANSWER = PRELUDE + r"""
-- KEYS: the keys of the message's end (PRELUDE); ARGV: mid, text
-- The text of a message the store cancelled while its worker was dead (from its log), kept
-- unless the worker saved it first.
if redis.call('HGET', KEYS[1], 'state') ~= 'cancelled' then return 0 end
save_answer(ARGV[1], ARGV[2], 'cancelled', true)
return 1
"""

CONNECT = r"""
-- A connection of a user takes a slot, unless the user has `limit` already (across gateways).
-- KEYS: the user's connections; ARGV: member (gateway id:n), now_ms, lapse_ms, limit
-- Entries lapse unless their gateway's heartbeat renews them: a killed gateway frees its slots.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
