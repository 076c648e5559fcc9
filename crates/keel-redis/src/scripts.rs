//! The Lua scripts of the Redis broker, each one atomic step in Redis. Loaded
//! once per connection and called by SHA (redis-rs loads a script again when
//! Redis answers NOSCRIPT, after a restart). Key layout: the crate docs.
//!
//! What they must not do: touch keys of more than one channel (one Redis
//! Cluster slot each), or loop without a bound.

use std::sync::Arc;

use redis::Script;

/// Every script, built once per broker.
pub(crate) struct Scripts {
    pub(crate) publish: Arc<Script>,
    pub(crate) history: Arc<Script>,
    pub(crate) presence_add: Arc<Script>,
    pub(crate) presence_remove: Arc<Script>,
    pub(crate) presence_list: Arc<Script>,
    pub(crate) presence_expire: Arc<Script>,
    pub(crate) ticket_put: Arc<Script>,
    pub(crate) ticket_take: Arc<Script>,
    pub(crate) session_put: Arc<Script>,
    pub(crate) session_take: Arc<Script>,
    pub(crate) ensure: Arc<Script>,
    pub(crate) nodes: Arc<Script>,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        let s = |code: &str| Arc::new(Script::new(code));
        Scripts {
            publish: s(PUBLISH),
            history: s(HISTORY),
            presence_add: s(PRESENCE_ADD),
            presence_remove: s(PRESENCE_REMOVE),
            presence_list: s(PRESENCE_LIST),
            presence_expire: s(PRESENCE_EXPIRE),
            ticket_put: s(TICKET_PUT),
            ticket_take: s(TICKET_TAKE),
            session_put: s(SESSION_PUT),
            session_take: s(SESSION_TAKE),
            ensure: s(ENSURE),
            nodes: s(NODES),
        }
    }
}

/// KEYS: meta, stream, channel zset. ARGV: epoch candidate, history size,
/// history TTL (ms), meta TTL (ms), time (ms), publisher field, data, pub/sub
/// channel, channel name. Returns {offset, epoch}.
const PUBLISH: &str = r"
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[9])
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[1]
  redis.call('HSET', KEYS[1], 'e', e)
  redis.call('DEL', KEYS[2])
end
local s = redis.call('HINCRBY', KEYS[1], 's', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if tonumber(ARGV[2]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], s .. '-0', 't', ARGV[5], 'p', ARGV[6], 'd', ARGV[7])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
redis.call('PUBLISH', ARGV[8], s .. '\n' .. e .. '\n' .. ARGV[5] .. '\n' .. ARGV[6] .. '\n' .. ARGV[7])
return {s, e}
";

/// KEYS: meta, stream. ARGV: after, limit, oldest time kept (ms).
/// Drops entries older than the TTL from the front, then returns
/// {epoch, top offset, first kept offset (0: none), entries after `after`...},
/// or {nil} when the channel has no stream.
const HISTORY: &str = r"
local m = redis.call('HMGET', KEYS[1], 'e', 's')
if not m[1] then return {false} end
local min = tonumber(ARGV[3])
for _ = 1, 100 do
  local batch = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 100)
  if #batch == 0 then break end
  local dropped = 0
  for _, x in ipairs(batch) do
    local f, t = x[2], 0
    for i = 1, #f, 2 do if f[i] == 't' then t = tonumber(f[i + 1]) end end
    if t >= min then break end
    redis.call('XDEL', KEYS[2], x[1])
    dropped = dropped + 1
  end
  if dropped < #batch then break end
end
local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local first = 0
if #head > 0 then first = tonumber(string.match(head[1][1], '^(%d+)')) end
local out = {m[1], tonumber(m[2] or '0'), first}
if tonumber(ARGV[2]) > 0 then
  local from = (tonumber(ARGV[1]) + 1) .. '-0'
  for _, x in ipairs(redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', ARGV[2])) do
    out[#out + 1] = x
  end
end
return out
";

/// KEYS: presence hash, presence zset, channel zset. ARGV: client, info,
/// expires at (ms), now (ms), key TTL (ms), channel name. Returns 1 for a join,
/// 0 for a refresh.
const PRESENCE_ADD: &str = r"
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[6])
local old = redis.call('ZSCORE', KEYS[2], ARGV[1])
local joined = 1
if old and tonumber(old) > tonumber(ARGV[4]) then joined = 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return joined
";

/// KEYS: presence hash, presence zset. ARGV: client, now (ms). Returns the
/// info of a client that was present, nil otherwise.
const PRESENCE_REMOVE: &str = r"
local sc = redis.call('ZSCORE', KEYS[2], ARGV[1])
local info = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if sc and tonumber(sc) > tonumber(ARGV[2]) and info then return info end
return false
";

/// KEYS: presence hash, presence zset. ARGV: now (ms). Returns {client, info,
/// ...} of those present.
const PRESENCE_LIST: &str = r"
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf')) do
  local info = redis.call('HGET', KEYS[1], id)
  if info then
    out[#out + 1] = id
    out[#out + 1] = info
  end
end
return out
";

/// KEYS: presence hash, presence zset. ARGV: now (ms). Removes the entries past
/// their time and returns {client, info, ...} of them.
const PRESENCE_EXPIRE: &str = r"
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, 1000)) do
  local info = redis.call('HGET', KEYS[1], id)
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  out[#out + 1] = id
  out[#out + 1] = info or 'null'
end
return out
";

/// KEYS: ticket, ticket zset. ARGV: value, TTL (ms), expires at (ms), now
/// (ms), most tickets, ticket key. Returns 1, or 0 when too many are held.
const TICKET_PUT: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[4])
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[6])
return 1
";

/// KEYS: ticket, ticket zset. ARGV: ticket key. Returns the value once.
const TICKET_TAKE: &str = r"
local v = redis.call('GETDEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return v
";

/// KEYS: session, session zset. ARGV: client, generation, data, TTL (ms),
/// expires at (ms), session id. A record of a later generation stays: the
/// session was resumed elsewhere meanwhile, and this is a stale copy (a zombie
/// connection that closed after the takeover).
const SESSION_PUT: &str = r"
local cur = redis.call('HGET', KEYS[1], 'g')
if cur and tonumber(cur) > tonumber(ARGV[2]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'c', ARGV[1], 'g', ARGV[2], 'd', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[6])
return 1
";

/// KEYS: session, session zset. ARGV: expected client ('' for any), expected
/// generation, session id, TTL of a claim (ms). Returns {0} missing, {1}
/// mismatch, or {2, client, generation, data} taken. A taken session leaves its
/// client and next generation behind (until its TTL), and so does a token
/// presented for a session Redis never saw (its node was killed before it could
/// write it): the token just used is refused on every node, one use per token
/// across the cluster.
const SESSION_TAKE: &str = r"
local v = redis.call('HMGET', KEYS[1], 'c', 'g', 'd')
local expect = ARGV[1] ~= ''
if expect and v[1] and (v[1] ~= ARGV[1] or v[2] ~= ARGV[2]) then return {1} end
if not v[3] then
  if expect then
    redis.call('HSET', KEYS[1], 'c', ARGV[1], 'g', tonumber(ARGV[2]) + 1)
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
  end
  redis.call('ZREM', KEYS[2], ARGV[3])
  return {0}
end
redis.call('HDEL', KEYS[1], 'd')
redis.call('HSET', KEYS[1], 'g', tonumber(v[2]) + 1)
redis.call('ZREM', KEYS[2], ARGV[3])
return {2, v[1], v[2], v[3]}
";

/// KEYS: meta, channel zset. ARGV: epoch candidate, meta TTL (ms), now (ms),
/// channel name. Makes sure the stream exists (an epoch, offset 0 if new) and
/// keeps it; returns the epoch.
const ENSURE: &str = r"
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
if redis.call('HSETNX', KEYS[1], 'e', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 's', 0)
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('HGET', KEYS[1], 'e')
";

/// KEYS: node zset (last seen, ms), node hash (connections). ARGV: now (ms),
/// TTL (ms), and optionally a node and its connections to announce. Drops the
/// nodes not seen within the TTL; returns {node, connections, last seen, ...}.
const NODES: &str = r"
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
if ARGV[3] then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
end
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl)) do
  redis.call('ZREM', KEYS[1], gone)
  redis.call('HDEL', KEYS[2], gone)
end
local out = {}
local live = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #live, 2 do
  out[#out + 1] = live[i]
  out[#out + 1] = redis.call('HGET', KEYS[2], live[i]) or '0'
  out[#out + 1] = live[i + 1]
end
return out
";
