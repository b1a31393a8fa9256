#!lua name=ringway
-- ringway's Redis functions (Redis >= 7.0); the schema is documented in the README and
-- in src/backplane/schema.rs. Times are Redis's own clock, so nodes' clocks never
-- matter.
--
-- This text is loaded as two libraries (src/backplane/schema.rs rewrites the name and
-- PREFIX): `ringway_v<VERSION>`, whose functions (`ringway_v<VERSION>_send`, …) the
-- gateways of this version call, loaded by each with FUNCTION LOAD REPLACE; and
-- `ringway`, the public names services call (`ringway_send`, …), replaced only when
-- the loaded one is older. So gateways of two versions share a Redis during a rolling
-- upgrade, each calling its own code. VERSION changes whenever a function's keys,
-- arguments or reply change.

local PREFIX = 'ringway_'
local VERSION = 3

-- In a Redis Cluster (src/backplane/schema.rs rewrites these two lines) every key but a
-- topic's is under '{ringway}:', one slot, so these functions never cross slots; and
-- messages go by sharded pub/sub, in the slot of the channel.
local NS = 'ringway:'
local SHARDED = false
local USER_PREFIX = NS .. 'user:'
local SHARD_PREFIX = NS .. 'shard:'
local NODE_PREFIX = NS .. 'node:'
local CONNS_PREFIX = NS .. 'conns:'
local REAPED_PREFIX = NS .. 'reaped:'
local LATE_PREFIX = NS .. 'late:'

local function publish_to(channel, message)
  if SHARDED then return redis.call('SPUBLISH', channel, message) end
  return redis.call('PUBLISH', channel, message)
end
-- How long a reaped process's mark is kept for its heartbeats to find.
local REAPED_TTL_MS = 86400000

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- "<unix ms>-<microseconds within the ms>" from Redis time, for callers without an id.
local function new_id()
  local t = redis.call('TIME')
  local us = tonumber(t[2])
  return string.format('%d-%d', tonumber(t[1]) * 1000 + math.floor(us / 1000), us % 1000)
end

-- The error reply for ARGV[2] (data) of ringway_send and ringway_publish when it is not
-- one valid JSON value; nil when it is.
local function bad_data(args)
  if args[2] == nil or not pcall(cjson.decode, args[2]) then
    return redis.error_reply('ERR ringway: data must be one valid JSON value')
  end
end

-- ARGV[1] (id, '' = generate) and ARGV[2] (data): the id to use, or nil and the error
-- reply.
local function id_and_data(args)
  local bad = bad_data(args)
  if bad then return nil, bad end
  if args[1] == nil or args[1] == '' then return new_id() end
  return args[1]
end

-- Presence costs nothing at rest: a connection's entry is written once when it opens
-- and removed when it closes; whether it is live is its node process's heartbeat
-- (ringway:node:<node>, whose JSON names the process's `boot`), checked at lookup.
-- Member: <node>/<shard>/<shard>-<conn>@<boot>. Each node process also indexes its
-- entries (ringway:conns:<node>@<boot>, field member, value user), so the entries of
-- a process that died without removing them can be reaped (by the heartbeats).

-- KEYS: ringway:user:<U>..., then ringway:conns:<node>@<boot>; ARGV: member for each
-- user key (same order).
local function presence_set(keys, args)
  local n = #keys - 1
  local index = keys[#keys]
  for i = 1, n do
    redis.call('ZADD', keys[i], 0, args[i])
    -- Entries of an older version expired with their key; these do not.
    redis.call('PERSIST', keys[i])
    redis.call('HSET', index, args[i], string.sub(keys[i], #USER_PREFIX + 1))
  end
  return n
end

-- KEYS: ringway:user:<U>..., then ringway:conns:<node>@<boot>; ARGV: member for each
-- user key.
local function presence_del(keys, args)
  local n = #keys - 1
  local index = keys[#keys]
  for i = 1, n do
    redis.call('ZREM', keys[i], args[i])
    redis.call('HDEL', index, args[i])
  end
  return n
end

-- Removes up to `batch` entries of one node process whose heartbeat stopped before
-- `before` (ms), and forgets the process once none are left; marks the process as
-- reaped (`ringway:reaped:<node>@<boot>`), so that if it was only late its heartbeats
-- tell it to register again. Returns how many entries it removed.
local function reap(incarnations, before, batch)
  local dead = redis.call('ZRANGE', incarnations, '-inf', before, 'BYSCORE', 'LIMIT', 0, 1)[1]
  if not dead then return 0 end
  local index = CONNS_PREFIX .. dead
  local fv = redis.call('HSCAN', index, 0, 'COUNT', batch)[2]
  if #fv > 0 then
    redis.call('SET', REAPED_PREFIX .. dead, '1', 'PX', REAPED_TTL_MS)
  end
  for i = 1, #fv, 2 do
    redis.call('ZREM', USER_PREFIX .. fv[i + 1], fv[i])
    redis.call('HDEL', index, fv[i])
  end
  if redis.call('EXISTS', index) == 0 then
    redis.call('ZREM', incarnations, dead)
  end
  return #fv / 2
end

-- The last id a stream gave out, as (ms, seq); (0, 0) when there is no stream.
local function last_id(key)
  if redis.call('EXISTS', key) == 0 then return 0, 0 end
  local info = redis.call('XINFO', 'STREAM', key)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      local ms, seq = string.match(info[i + 1], '^(%d+)-(%d+)$')
      return tonumber(ms), tonumber(seq)
    end
  end
  return 0, 0
end

-- KEYS: ringway:user:<U>... [, ringway:inbox:<U>... (same users, same order)];
-- ARGV: id ('' = generate), data (JSON) [, inbox size, inbox ttl ms].
-- With the inbox keys, the message is also appended to each user's inbox stream (for
-- acknowledged delivery) under one id above every one of those streams' ids.
-- Publishes once to each shard that holds any of the users, on nodes whose heartbeat
-- key (ringway:node:<node>) is alive.
-- Returns {users online, shards published to, id, stored (0/1), connections}.
local function send(keys, args)
  local bad = bad_data(args)
  if bad then return bad end
  local users = #keys
  local size = tonumber(args[3] or '0')
  local ttl = tonumber(args[4] or '0')
  if args[3] ~= nil then
    if #keys % 2 ~= 0 then
      return redis.error_reply('ERR ringway: with an inbox size, pass each user key and then each inbox key')
    end
    users = #keys / 2
  end
  if size == nil or ttl == nil or size < 0 or ttl < 0 then
    return redis.error_reply('ERR ringway: inbox size and ttl must be numbers >= 0')
  end
  local stored = size > 0 and ttl > 0 and args[3] ~= nil
  local id
  if stored then
    if args[1] ~= nil and args[1] ~= '' then
      return redis.error_reply('ERR ringway: with an inbox the id is the inbox stream id; pass "" as id')
    end
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    -- Each inbox once, though a user may be named twice.
    local inboxes, named = {}, {}
    for i = users + 1, #keys do
      if not named[keys[i]] then
        named[keys[i]] = true
        inboxes[#inboxes + 1] = keys[i]
      end
    end
    local ms, seq = now, 0
    for _, key in ipairs(inboxes) do
      local lms, lseq = last_id(key)
      if lms > ms then
        ms, seq = lms, lseq + 1
      elseif lms == ms and lseq + 1 > seq then
        seq = lseq + 1
      end
    end
    id = string.format('%d-%d', ms, seq)
    for _, key in ipairs(inboxes) do
      redis.call('XADD', key, 'MAXLEN', size, id, 'd', args[2])
      redis.call('XTRIM', key, 'MINID', string.format('%d', now - ttl + 1))
      redis.call('PEXPIRE', key, ttl)
    end
  elseif args[1] == nil or args[1] == '' then
    id = new_id()
  else
    id = args[1]
  end
  -- A connection is live while its node process's heartbeat is: the node key exists
  -- and names the boot in the member. A dead process's entries wait for the reaper
  -- (in node_alive).
  local boots = {}
  local function member_alive(member)
    local node, boot = string.match(member, '^([^/]*)/[^@]*@(.*)$')
    if not node then return false end
    local b = boots[node]
    if b == nil then
      b = false
      local info = redis.call('GET', NODE_PREFIX .. node)
      if info then
        local ok, v = pcall(cjson.decode, info)
        if ok and type(v) == 'table' and type(v.boot) == 'string' then b = v.boot end
      end
      boots[node] = b
    end
    return b == boot
  end
  local routes, order, done, online, connections = {}, {}, {}, 0, 0
  for i = 1, users do
    local key = keys[i]
    if not done[key] then
      done[key] = true
      local user = string.sub(key, #USER_PREFIX + 1)
      local members = redis.call('ZRANGE', key, 0, -1)
      local live = 0
      local seen = {}
      for _, member in ipairs(members) do
        local route = string.match(member, '^(.*)/[^/]*$')
        local node = string.match(member, '^([^/]*)/')
        if route and member_alive(member) then live = live + 1 else route = nil end
        if route and not seen[route] then
          seen[route] = true
          local list = routes[route]
          if not list then
            list = {}
            routes[route] = list
            order[#order + 1] = route
          end
          list[#list + 1] = user
        end
      end
      if live > 0 then online = online + 1 end
      connections = connections + live
    end
  end
  for _, route in ipairs(order) do
    publish_to(SHARD_PREFIX .. route, '{"users":' .. cjson.encode(routes[route])
      .. ',"id":' .. cjson.encode(id) .. ',"data":' .. args[2] .. '}')
  end
  return {online, #order, id, stored and 1 or 0, connections}
end

-- KEYS: ringway:inbox:<U>; ARGV: id. Acknowledges the user's direct messages up to id
-- (cumulative). Returns how many left the inbox.
local function ack(keys, args)
  local ms, seq = string.match(args[1] or '', '^(%d+)-(%d+)$')
  if not ms then return redis.error_reply('ERR ringway: ack needs a message id') end
  return redis.call('XTRIM', keys[1], 'MINID', ms .. '-' .. string.format('%d', tonumber(seq) + 1))
end

-- Whether stream id a is below stream id b.
local function stream_id_less(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, bms = tonumber(ams), tonumber(bms)
  if ams ~= bms then return ams < bms end
  return tonumber(aseq) < tonumber(bseq)
end

-- A new history epoch: Redis time in microseconds, base 36.
local function new_epoch()
  local t = redis.call('TIME')
  local n = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local digits, out = '0123456789abcdefghijklmnopqrstuvwxyz', ''
  while n > 0 do
    local d = n % 36
    out = string.sub(digits, d + 1, d + 1) .. out
    n = (n - d) / 36
  end
  return out
end

-- How long a quiet topic keeps its history keys past its history TTL. After that a
-- resume answers epoch_changed (the epoch is gone with the keys).
local KEEP_MS = 86400000

-- KEYS: ringway:topic:<T> [, ringway:history:<T>, ringway:epoch:<T>];
-- ARGV: id ('' = generate), data (JSON) [, history size, history ttl ms].
-- With the history keys and a size and ttl above 0, the message is appended to the
-- topic's stream and its id is the stream id (Redis assigns it: one order per topic
-- across every node); the envelope then carries the topic's epoch.
-- Returns {id, receivers (shards subscribed), epoch or nil}.
local function publish(keys, args)
  if keys[2] == nil then
    local id, bad = id_and_data(args)
    if not id then return bad end
    local n = publish_to(keys[1], '{"id":' .. cjson.encode(id) .. ',"data":' .. args[2] .. '}')
    return {id, n}
  end
  if #keys ~= 3 then
    return redis.error_reply('ERR ringway: pass 1 key (channel) or 3 (channel, history, epoch)')
  end
  local bad = bad_data(args)
  if bad then return bad end
  local size = tonumber(args[3] or '100')
  local ttl = tonumber(args[4] or '300000')
  if size == nil or ttl == nil or size < 0 or ttl < 0 then
    return redis.error_reply('ERR ringway: history size and ttl must be numbers >= 0')
  end
  if size == 0 or ttl == 0 then
    local id = args[1]
    if id == nil or id == '' then id = new_id() end
    local n = publish_to(keys[1], '{"id":' .. cjson.encode(id) .. ',"data":' .. args[2] .. '}')
    return {id, n}
  end
  if args[1] ~= nil and args[1] ~= '' then
    return redis.error_reply('ERR ringway: with history the id is the stream id; pass "" as id')
  end
  local epoch = redis.call('GET', keys[3])
  -- A stream without its epoch, or an epoch without its stream, lost history (an
  -- eviction, a restart without persistence): start a new epoch on a fresh stream.
  if not epoch or redis.call('EXISTS', keys[2]) == 0 then
    epoch = new_epoch()
    redis.call('DEL', keys[2])
    redis.call('SET', keys[3], epoch)
  end
  local id = redis.call('XADD', keys[2], '*', 'd', args[2])
  -- Trim to the size and the age. Trimming does not move the stream's
  -- max-deleted-entry-id (XDEL does), and a resume needs it to tell "missed nothing"
  -- from "missed something that is gone": so it is set here, to the last id trimmed.
  local cut = false
  local over = redis.call('XLEN', keys[2]) - size
  if over > 0 then
    local old = redis.call('XRANGE', keys[2], '-', '+', 'COUNT', over)
    cut = old[#old][1]
  end
  local ms = tonumber(string.match(id, '^(%d+)-'))
  local limit = ms - ttl
  -- The oldest entry left: only when it has aged is the (slower) search for the last
  -- aged one made.
  local first = redis.call('XRANGE', keys[2], cut and ('(' .. cut) or '-', '+', 'COUNT', 1)
  if #first > 0 and tonumber(string.match(first[1][1], '^(%d+)-')) <= limit then
    local aged = redis.call('XREVRANGE', keys[2], string.format('%d', limit), '-', 'COUNT', 1)
    if #aged > 0 and (not cut or stream_id_less(cut, aged[1][1])) then
      cut = aged[1][1]
    end
  end
  if cut then
    local cms, cseq = string.match(cut, '^(%d+)-(%d+)$')
    redis.call('XTRIM', keys[2], 'MINID', cms .. '-' .. string.format('%d', tonumber(cseq) + 1))
    redis.call('XSETID', keys[2], id, 'MAXDELETEDID', cut)
  end
  redis.call('PEXPIRE', keys[2], ttl + KEEP_MS)
  redis.call('PEXPIRE', keys[3], ttl + KEEP_MS)
  local n = publish_to(keys[1], '{"id":"' .. id .. '","epoch":"' .. epoch
    .. '","data":' .. args[2] .. '}')
  return {id, n, epoch}
end

-- KEYS: ringway:history:<T>, ringway:epoch:<T>; ARGV: first (XRANGE start: '-' or
-- '(<id>'), count (0 = no entries, only the position).
-- Returns {epoch or nil, last id given out or nil (no stream), highest id trimmed
-- away or nil, entries [[id, [field, value, ...]], ...]}.
local function history(keys, args)
  local epoch = redis.call('GET', keys[2])
  if redis.call('EXISTS', keys[1]) == 0 then
    return {epoch, false, false, {}}
  end
  local info = redis.call('XINFO', 'STREAM', keys[1])
  local last, deleted = false, false
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1]
    elseif info[i] == 'max-deleted-entry-id' then deleted = info[i + 1] end
  end
  local entries = {}
  local count = tonumber(args[2])
  if count and count > 0 then
    entries = redis.call('XRANGE', keys[1], args[1], '+', 'COUNT', count)
  end
  return {epoch, last, deleted, entries}
end

-- KEYS: ringway:nodes, ringway:node:<id>, ringway:incarnations; ARGV: ttl_ms, node
-- id, info JSON (with the process's `boot`), <node>@<boot>, reap batch. Returns 1, or 0
-- while a reaper's mark says it removed entries of this process: the process was late
-- (paused, starved or cut off) and looked dead; it registers them again and deletes
-- the mark. A late beat that nobody reaped is 1: its entries are all there. Once this
-- has run no reaper takes the process, so nothing it registers after the answer is
-- lost.
--
-- Then it reaps a batch of a process whose heartbeat stopped over ttl_ms ago, but only
-- if this node has itself been on time for ttl_ms (`ringway:late:<node>@<boot>`).
-- When Redis is too slow for everyone (starved, or stalled), every node's beat is
-- late at once; a node that reaped then would take the entries of nodes whose beats
-- merely wait behind its own, and they would all register everything again.
local function node_alive(keys, args)
  local now = now_ms()
  local ttl = tonumber(args[1])
  local late = redis.call('EXISTS', keys[2]) == 0
  -- Kept until the node deletes it, having asked its shards to register again: were
  -- this answer lost with the connection, the next beat says it again.
  local reaped = redis.call('EXISTS', REAPED_PREFIX .. args[4]) == 1
  redis.call('ZADD', keys[1], now + ttl, args[2])
  redis.call('ZREMRANGEBYSCORE', keys[1], '-inf', now)
  redis.call('SET', keys[2], args[3], 'PX', ttl)
  redis.call('ZADD', keys[3], now + ttl, args[4])
  if late then
    redis.call('SET', LATE_PREFIX .. args[4], '1', 'PX', ttl)
  elseif redis.call('EXISTS', LATE_PREFIX .. args[4]) == 0 then
    reap(keys[3], now - ttl, tonumber(args[5]) or 500)
  end
  if reaped then return 0 end
  return 1
end

-- KEYS: ringway:nodes, ringway:node:<id>, ringway:incarnations; ARGV: node id,
-- <node>@<boot>. The node drained: it is gone now, and whatever entries it could not
-- remove are reaped.
local function node_gone(keys, args)
  redis.call('ZREM', keys[1], args[1])
  redis.call('DEL', keys[2])
  redis.call('ZADD', keys[3], 0, args[2])
  return 1
end

redis.register_function(PREFIX .. 'presence_set', presence_set)
redis.register_function(PREFIX .. 'presence_del', presence_del)
redis.register_function(PREFIX .. 'send', send)
redis.register_function(PREFIX .. 'ack', ack)
redis.register_function(PREFIX .. 'publish', publish)
redis.register_function{function_name = PREFIX .. 'history', callback = history, flags = {'no-writes'}}
redis.register_function(PREFIX .. 'node_alive', node_alive)
redis.register_function(PREFIX .. 'node_gone', node_gone)
redis.register_function{function_name = PREFIX .. 'version', callback = function() return VERSION end, flags = {'no-writes'}}
