#!lua name=ringway
-- ringway's Redis functions (Redis >= 7.0). Loaded by every gateway at start with
-- FUNCTION LOAD REPLACE; the schema is documented in the README and in
-- src/backplane/schema.rs. Times are Redis's own clock, so nodes' clocks never matter.

local USER_PREFIX = 'ringway:user:'
local SHARD_PREFIX = 'ringway:shard:'

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

-- ARGV[1] (id, '' = generate) and ARGV[2] (data, one JSON value) of ringway_send and
-- ringway_publish: the id to use, or nil and the error reply.
local function id_and_data(args)
  if args[2] == nil or not pcall(cjson.decode, args[2]) then
    return nil, redis.error_reply('ERR ringway: data must be one valid JSON value')
  end
  if args[1] == nil or args[1] == '' then return new_id() end
  return args[1]
end

-- KEYS: ringway:user:<U>...; ARGV: ttl_ms, member for each key (same order).
local function presence_set(keys, args)
  local now = now_ms()
  local expiry = now + tonumber(args[1])
  for i, key in ipairs(keys) do
    redis.call('ZADD', key, expiry, args[i + 1])
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    redis.call('PEXPIREAT', key, math.floor(tonumber(last[2])))
  end
  return #keys
end

-- KEYS: ringway:user:<U>...; ARGV: member for each key.
local function presence_del(keys, args)
  for i, key in ipairs(keys) do
    redis.call('ZREM', key, args[i])
  end
  return #keys
end

-- KEYS: ringway:user:<U>...; ARGV: id ('' = generate), data (JSON).
-- Publishes once to each shard that holds any of the users.
-- Returns {users online, shards published to, id}.
local function send(keys, args)
  local id, bad = id_and_data(args)
  if not id then return bad end
  local now = now_ms()
  local routes, order, done, online = {}, {}, {}, 0
  for _, key in ipairs(keys) do
    if not done[key] then
      done[key] = true
      local user = string.sub(key, #USER_PREFIX + 1)
      local members = redis.call('ZRANGE', key, now, '+inf', 'BYSCORE')
      if #members > 0 then online = online + 1 end
      local seen = {}
      for _, member in ipairs(members) do
        local route = string.match(member, '^(.*)/[^/]*$')
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
    end
  end
  for _, route in ipairs(order) do
    redis.call('PUBLISH', SHARD_PREFIX .. route, '{"users":' .. cjson.encode(routes[route])
      .. ',"id":' .. cjson.encode(id) .. ',"data":' .. args[2] .. '}')
  end
  return {online, #order, id}
end

-- KEYS: ringway:topic:<T>; ARGV: id ('' = generate), data (JSON).
-- Returns {id, receivers (shards subscribed)}.
local function publish(keys, args)
  local id, bad = id_and_data(args)
  if not id then return bad end
  local n = redis.call('PUBLISH', keys[1], '{"id":' .. cjson.encode(id) .. ',"data":' .. args[2] .. '}')
  return {id, n}
end

-- KEYS: ringway:nodes, ringway:node:<id>; ARGV: ttl_ms, node id, info JSON.
local function node_alive(keys, args)
  local now = now_ms()
  local ttl = tonumber(args[1])
  redis.call('ZADD', keys[1], now + ttl, args[2])
  redis.call('ZREMRANGEBYSCORE', keys[1], '-inf', now)
  redis.call('SET', keys[2], args[3], 'PX', ttl)
  return 1
end

-- KEYS: ringway:nodes, ringway:node:<id>; ARGV: node id.
local function node_gone(keys, args)
  redis.call('ZREM', keys[1], args[1])
  redis.call('DEL', keys[2])
  return 1
end

redis.register_function('ringway_presence_set', presence_set)
redis.register_function('ringway_presence_del', presence_del)
redis.register_function('ringway_send', send)
redis.register_function('ringway_publish', publish)
redis.register_function('ringway_node_alive', node_alive)
redis.register_function('ringway_node_gone', node_gone)
